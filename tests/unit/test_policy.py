"""EgressPolicy: host rules, address rules, listeners, and the connect guard's resolve."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import pytest

from sidecar import config as config_module
from sidecar.policy.egress import REASONS, EgressPolicy, PolicyDenied, exposure_warnings, local_addresses


@dataclass(frozen=True)
class Target:
    host: str
    port: int = 443
    route: object | None = None
    scheme: str = "https"


def denial(policy: EgressPolicy, host: str, port: int = 443, routed: bool = False) -> tuple[str, str] | None:
    try:
        policy.check_target(Target(host, port, object() if routed else None))
    except PolicyDenied as exc:
        assert exc.reason in REASONS
        assert "\n" not in exc.detail and exc.subject is not None and "\n" not in exc.subject
        return exc.kind, exc.reason
    return None


def test_allow_public_default_passes_public_names_and_addresses() -> None:
    policy = EgressPolicy()
    assert denial(policy, "api.github.com") is None
    assert denial(policy, "1.1.1.1") is None


def test_deny_hosts_with_wildcards_win_over_allow_public() -> None:
    policy = EgressPolicy(deny_hosts=["*.evil.example", "pastebin.com"])
    assert denial(policy, "x.evil.example") == ("denied_host", "host_denied")
    assert denial(policy, "PASTEBIN.com.") == ("denied_host", "host_denied")
    assert denial(policy, "evil.example") is None


def test_default_deny_passes_only_listed_hosts() -> None:
    policy = EgressPolicy(default="deny", allow_hosts=["api.github.com", "*.stripe.com"])
    assert denial(policy, "api.github.com") is None
    assert denial(policy, "api.stripe.com") is None
    assert denial(policy, "example.com") == ("denied_host", "not_allowed")
    assert denial(policy, "1.1.1.1") == ("denied_host", "not_allowed")


def test_routes_are_allowed_by_being_configured_but_addresses_still_checked() -> None:
    policy = EgressPolicy(default="deny", deny_hosts=["internal.example"])
    assert denial(policy, "internal.example", routed=True) is None
    assert denial(policy, "10.0.0.1", routed=True) == ("denied_ip", "private")


@pytest.mark.parametrize("host", ["169.254.169.254", "2852039166", "0xa9.0xfe.0xa9.0xfe", "[::ffff:a9fe:a9fe]"])
def test_literal_metadata_address_in_any_spelling_is_denied(host: str) -> None:
    assert denial(EgressPolicy(), host) == ("denied_ip", "metadata")


def test_allow_cidrs_opts_a_private_range_back_in() -> None:
    policy = EgressPolicy(allow_cidrs=["10.20.0.0/16"])
    assert denial(policy, "10.20.1.2") is None
    assert denial(policy, "10.21.1.2") == ("denied_ip", "private")


def test_own_listeners_are_denied_under_any_spelling_even_when_loopback_is_allowed() -> None:
    policy = EgressPolicy(allow_cidrs=["127.0.0.0/8", "::1/128"], listeners=[("127.0.0.1", 15001)])
    for host in ("127.0.0.1", "2130706433", "127.1", "0x7f.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "127.0.0.2"):
        assert denial(policy, host, 15001) == ("denied_ip", "listener"), host
    assert denial(policy, "127.0.0.1", 15002) is None


def test_wildcard_listener_is_denied_by_local_address() -> None:
    pod_ip = ipaddress.ip_address("10.1.2.3")
    policy = EgressPolicy(allow_cidrs=["10.0.0.0/8"], listeners=[("0.0.0.0", 15090)], local_addresses=[pod_ip])
    assert denial(policy, "10.1.2.3", 15090) == ("denied_ip", "listener")
    assert denial(policy, "10.1.2.4", 15090) is None


def test_listener_bound_to_port_zero_is_added_after_binding() -> None:
    policy = EgressPolicy(allow_cidrs=["127.0.0.0/8"], listeners=[("127.0.0.1", 0)])
    assert denial(policy, "127.0.0.1", 40000) is None
    policy.add_listener("127.0.0.1", 40000)
    assert denial(policy, "127.0.0.1", 40000) == ("denied_ip", "listener")


def test_static_resolve_to_a_denied_address_is_denied_before_connect() -> None:
    policy = EgressPolicy(static_resolve={"metadata.test": "169.254.169.254", "mixed.test": ["1.1.1.1", "10.0.0.1"]})
    assert denial(policy, "metadata.test") == ("denied_ip", "metadata")
    assert denial(policy, "Mixed.Test.") == ("denied_ip", "private")


def test_invalid_hosts_are_denied_not_resolved() -> None:
    assert denial(EgressPolicy(), "1.2.3.4.5") == ("denied_host", "invalid_host")
    assert denial(EgressPolicy(), "a b") == ("denied_host", "invalid_host")


def test_body_names_the_host_but_not_the_addresses() -> None:
    policy = EgressPolicy(static_resolve={"mixed.test": ["1.1.1.1", "10.0.0.1"]})
    with pytest.raises(PolicyDenied) as info:
        policy.check_host("mixed.test", 443)
    subject = info.value.subject or ""
    assert subject == "mixed.test resolves to a private address"
    assert "10.0.0.1" not in subject and "1.1.1.1" not in subject
    assert info.value.address == "10.0.0.1"
    assert "address=10.0.0.1" in info.value.detail  # the audit log line has it


def resolve(policy: EgressPolicy, host: str, port: int = 443) -> list[str]:
    return asyncio.run(policy.resolve(host, port))


def test_resolve_returns_the_checked_addresses() -> None:
    policy = EgressPolicy(static_resolve={"api.test": ["1.1.1.1", "2606:4700::1111"]})
    assert resolve(policy, "API.test") == ["1.1.1.1", "2606:4700::1111"]
    assert resolve(policy, "[2606:4700::1111]") == ["2606:4700::1111"]


def test_resolve_denies_a_name_if_any_address_is_denied() -> None:
    policy = EgressPolicy(static_resolve={"mixed.test": ["1.1.1.1", "10.0.0.1"]})
    with pytest.raises(PolicyDenied) as info:
        resolve(policy, "mixed.test")
    assert (info.value.kind, info.value.reason) == ("denied_ip", "private")


def test_resolve_checks_system_resolver_answers() -> None:
    # localhost resolves (via /etc/hosts) to loopback only: no packet leaves the machine.
    with pytest.raises(PolicyDenied) as info:
        resolve(EgressPolicy(), "localhost")
    assert info.value.reason == "loopback"
    assert set(resolve(EgressPolicy(allow_cidrs=["127.0.0.0/8", "::1/128"]), "localhost")) <= {"127.0.0.1", "::1"}


def test_resolve_denies_the_listener_by_name() -> None:
    policy = EgressPolicy(allow_cidrs=["127.0.0.0/8", "::1/128"], listeners=[("127.0.0.1", 15001)])
    with pytest.raises(PolicyDenied) as info:
        resolve(policy, "localhost", 15001)
    assert info.value.reason == "listener"


def test_from_config_builds_the_policy_and_warns_about_exposure() -> None:
    config = config_module.from_mapping({
        "listen": {"host": "0.0.0.0", "allow_non_loopback": True},
        "policy": {"default": "deny", "allow_hosts": ["*.example.com"]},
        "resolve": {"db.example.com": "10.0.0.9"},
        "routes": [{"name": "r", "prefix": "/r", "upstream": "https://r.example", "tls": {"insecure_skip_verify": True}}],
    })
    policy = EgressPolicy.from_config(config)
    assert denial(policy, "www.example.com") is None
    assert denial(policy, "db.example.com") == ("denied_ip", "private")
    assert denial(policy, "127.0.0.1", 15001) == ("denied_ip", "listener")
    warnings = exposure_warnings(config)
    assert any("allow_non_loopback" in w for w in warnings)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"policy": {"allow_hosts": ["a b"]}}, "policy.allow_hosts"),
        ({"policy": {"deny_hosts": ["*.10.0.0.1"]}}, "policy.deny_hosts"),
        ({"resolve": {"x.test": ["1.1.1.1", "nope"]}}, "resolve.x.test"),
        ({"resolve": {"x.test": []}}, "resolve.x.test"),
        ({"tls": {"insecure_skip_verify": True}}, "tls.insecure_skip_verify"),
        ({"tls": {"key_file": "/k.pem"}}, "tls.key_file"),
    ],
)
def test_config_validation_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(config_module.ConfigError, match=key.replace(".", r"\.")):
        config_module.from_mapping(raw)


def test_local_addresses_include_loopback() -> None:
    found = local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
