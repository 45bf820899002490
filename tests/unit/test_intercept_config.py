"""Interception config and host routes: `intercept.*`, `routes[].match_hosts`, and the Targets they give. Pure."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sidecar import config as cfg
from sidecar.intercept.interceptor import intercepted_patterns
from sidecar.proxy.routing import INTERCEPTED, Router, compile_route

CONFIG = cfg.from_mapping({
    "intercept": {"hosts": ["api.example.com", "*.Stripe.com."]},
    "routes": [
        {"name": "github", "prefix": "/github", "upstream": "https://api.github.com"},
        {"name": "pay", "match_hosts": ["*.payments.test", "pay.test"],
         "headers": {"authorization": {"value": "Bearer t"}}},
        {"name": "ip", "match_hosts": ["10.1.2.3"]},
    ],
})
ROUTER = Router(CONFIG, [compile_route(r, CONFIG) for r in CONFIG.routes])


def scope(raw_path: bytes, host: bytes, **extra: Any) -> dict[str, Any]:
    return {"raw_path": raw_path, "path": raw_path.decode(), "query_string": b"", "headers": [(b"host", host)],
            **extra}


def test_intercepted_names_are_the_intercept_hosts_and_route_hosts_without_addresses() -> None:
    assert intercepted_patterns(CONFIG) == ["api.example.com", "*.stripe.com", "*.payments.test", "pay.test"]
    assert intercepted_patterns(cfg.Config()) == []


def test_a_forwarded_request_to_a_matched_host_takes_the_route_and_keeps_its_destination() -> None:
    target = ROUTER.resolve(scope(b"/v1/x", b"EU.Payments.test:8443"))
    assert target.route is not None and target.route.name == "pay"
    assert (target.scheme, target.host, target.port, target.path) == ("https", "eu.payments.test", 8443, "/v1/x")
    assert target.host_header == b"eu.payments.test:8443"
    assert ROUTER.resolve(scope(b"/", b"pay.test")).route.name == "pay"  # type: ignore[union-attr]


def test_hosts_no_route_matches_stay_unrouted_and_prefix_routes_are_unchanged() -> None:
    assert ROUTER.resolve(scope(b"/", b"payments.test")).route is None  # *.suffix is not the apex
    assert ROUTER.resolve(scope(b"/", b"xpay.test")).route is None
    target = ROUTER.resolve(scope(b"/github/a", b"127.0.0.1:15001"))
    assert target.route is not None and target.route.name == "github"


def test_an_intercepted_request_goes_to_the_tunnel_authority_whatever_its_host_header() -> None:
    target = ROUTER.resolve(scope(b"/charge?x", b"evil.example.net", **{INTERCEPTED: "a.payments.test:443"}))
    assert (target.scheme, target.host, target.port, target.path) == ("https", "a.payments.test", 443, "/charge?x")
    assert target.host_header == b"a.payments.test"
    assert target.route is not None and target.route.name == "pay"
    plain = ROUTER.resolve(scope(b"/", b"x", **{INTERCEPTED: "api.example.com:8443"}))
    assert (plain.route, plain.host_header) == (None, b"api.example.com:8443")


def test_a_host_only_route_keys_its_breaker_by_its_first_pattern() -> None:
    route = compile_route(CONFIG.routes[1], CONFIG)
    assert (route.prefix, route.host, route.port) == (b"", "*.payments.test", 443)


@pytest.mark.parametrize(("raw", "key"), [
    ({"intercept": {"hosts": ["*"]}}, "intercept.hosts"),
    ({"intercept": {"hosts": ["bad host"]}}, "intercept.hosts"),
    ({"intercept": {"hosts": ["10.0.0.1"]}}, "intercept.hosts[0]"),
    ({"intercept": {"ca_dir": "relative/ca"}}, "intercept.ca_dir"),
    ({"intercept": {"ca_validity": "10m"}}, "intercept.ca_validity"),
    ({"intercept": {"leaf_cache": 0}}, "intercept.leaf_cache"),
    ({"routes": [{"name": "r"}]}, "routes[0]"),
    ({"routes": [{"name": "r", "prefix": "/r"}]}, "routes[0].upstream"),
    ({"routes": [{"name": "r", "upstream": "https://a.test"}]}, "routes[0].prefix"),
    ({"routes": [{"name": "r", "match_hosts": ["*"]}]}, "routes[0].match_hosts"),
    ({"routes": [{"name": "r", "match_hosts": ["a..b"]}]}, "routes[0].match_hosts"),
])
def test_bad_interception_config_names_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(cfg.ConfigError, match=re.escape(f"at `$.{key}`")):
        cfg.from_mapping(raw)


def test_interception_is_unready_without_its_bundle_or_past_the_cas_end(tmp_path: Any) -> None:
    import datetime

    from sidecar.intercept.interceptor import build_interceptor

    interceptor = build_interceptor(cfg.from_mapping({"intercept": {"hosts": ["a.test"], "ca_dir": str(tmp_path)}}))
    assert interceptor is not None
    assert interceptor.unready() == "interception CA bundle missing"
    interceptor.write_files(b"")
    assert interceptor.unready() is None
    interceptor.ca.not_after = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    assert "expired" in (interceptor.unready() or "")


def test_international_names_are_intercepted_and_constrained_in_their_ascii_form() -> None:
    config = cfg.from_mapping({"intercept": {"hosts": ["*.Bücher.de", "straße.example."]}})
    # As the host rules read them (sidecar.policy.hostnames: UTS #46, non-transitional: ß stays ß).
    assert intercepted_patterns(config) == ["*.xn--bcher-kva.de", "xn--strae-oqa.example"]
