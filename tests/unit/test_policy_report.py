"""Report mode: host-rule refusals become would-deny reasons; address rules hold in every mode."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sidecar.policy.egress import EgressPolicy, PolicyDenied


@dataclass(frozen=True)
class Target:
    host: str
    port: int = 443
    route: object | None = None


def reporting(**rules: object) -> EgressPolicy:
    return EgressPolicy(mode="report", default="deny", allow_hosts=["api.example.com"],  # type: ignore[arg-type]
                        deny_hosts=["*.evil.example"], static_resolve={"meta.example": "169.254.169.254"},
                        listeners=[("127.0.0.1", 15001)], **rules)


@pytest.mark.parametrize(("host", "reason"), [
    ("unlisted.example", "not_allowed"),
    ("x.evil.example", "host_denied"),
    ("1.1.1.1", "not_allowed"),  # a public literal, not on the allow list
])
def test_report_mode_returns_the_host_rule_that_would_refuse(host: str, reason: str) -> None:
    assert reporting().check_target(Target(host)) == reason
    with pytest.raises(PolicyDenied) as denied:
        EgressPolicy(default="deny", allow_hosts=["api.example.com"], deny_hosts=["*.evil.example"]).check_target(
            Target(host))
    assert denied.value.reason == reason  # the same name, enforced


def test_report_mode_passes_allowed_hosts_and_routes_silently() -> None:
    policy = reporting()
    assert policy.check_target(Target("api.example.com")) is None
    assert policy.check_target(Target("unlisted.example", route=object())) is None


@pytest.mark.parametrize(("host", "port", "reason"), [
    ("169.254.169.254", 443, "metadata"),
    ("10.0.0.1", 443, "private"),
    ("127.0.0.1", 443, "loopback"),
    ("0x7f.1", 15001, "listener"),
    ("meta.example", 443, "metadata"),  # not allowed AND resolves to metadata: the address rule wins
    ("[::ffff:169.254.169.254]", 443, "metadata"),
])
def test_address_rules_are_enforced_in_report_mode(host: str, port: int, reason: str) -> None:
    with pytest.raises(PolicyDenied) as denied:
        reporting().check_target(Target(host, port))
    assert (denied.value.kind, denied.value.reason) == ("denied_ip", reason)


def test_an_invalid_host_is_refused_in_report_mode() -> None:
    with pytest.raises(PolicyDenied) as denied:
        reporting().check_target(Target("1.2.3.4.5"))
    assert denied.value.reason == "invalid_host"


def test_the_connect_guard_still_refuses_private_answers_in_report_mode() -> None:
    import asyncio

    policy = EgressPolicy(mode="report", default="deny", static_resolve={"intranet.example": "192.168.1.1"})
    with pytest.raises(PolicyDenied) as denied:
        asyncio.run(policy.resolve("intranet.example", 443))
    assert denied.value.reason == "private"
