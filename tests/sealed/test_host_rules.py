"""Host rules through the real sidecar: default deny, allow/deny lists with wildcards, case,
trailing dot and IDNA forms, routes allowed by configuration, and the exposure warning.

Sealed: every name maps (static `resolve:`) to 1.1.1.1, whose catcher answers over TLS, so an
allowed host is seen arriving and a denied one is seen not arriving.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, Sidecar, base_config, start_sidecar
from tests.sealed.catchers import Catchers
from tests.sealed.test_ssrf import assert_denied, error_lines, forward, via_route

NAMES = ["exact.test", "allowed.test", "api.allowed.test", "a.deep.allowed.test", "bad.allowed.test",
         "other.test", "shop.xn--bcher-kva.test"]


@pytest.fixture(scope="module")
def deny_by_default(sealed_network: None, ca_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    config = base_config(
        ca_file,
        policy={
            "default": "deny",
            "allow_hosts": ["Exact.Test.", "*.allowed.test", "*.Bücher.test"],
            "deny_hosts": ["bad.allowed.test"],
            "allow_cidrs": [],
        },
        resolve={name: "1.1.1.1" for name in NAMES},
        routes=[{"name": "other", "prefix": "/other", "upstream": "https://other.test"}],
    )
    started = start_sidecar(tmp_path_factory.mktemp("hosts"), config)
    yield started
    started.terminate()


@pytest.mark.parametrize(
    "host",
    ["exact.test", "EXACT.test", "exact.test.", "api.allowed.test", "a.deep.allowed.test", "shop.xn--bcher-kva.test"],
)
def test_listed_hosts_pass_in_any_case_with_trailing_dot_and_idna(
    deny_by_default: Sidecar, caught: Catchers, host: str
) -> None:
    status, _headers, body = forward(deny_by_default, f"http://{host}/")
    assert (status, body) == (200, b"caught 1.1.1.1:443")
    caught.barrier()
    [connection] = caught.connections()
    assert connection.sni == host.lower().rstrip(".")


@pytest.mark.parametrize(
    ("host", "kind", "reason"),
    [
        ("other.test", "denied_host", "not_allowed"),  # only its route is configured
        ("allowed.test", "denied_host", "not_allowed"),  # *.allowed.test does not cover the apex
        ("bad.allowed.test", "denied_host", "host_denied"),  # deny wins over a matching allow
        ("exact.test.evil.example", "denied_host", "not_allowed"),
        ("1.1.1.1", "denied_host", "not_allowed"),  # public, but not listed
    ],
)
def test_unlisted_and_denied_hosts_are_refused(
    deny_by_default: Sidecar, caught: Catchers, host: str, kind: str, reason: str
) -> None:
    before = len(error_lines(deny_by_default))
    assert_denied(deny_by_default, caught, forward(deny_by_default, f"http://{host}/"), 403, kind, reason, before)


def test_a_route_is_allowed_by_being_configured(deny_by_default: Sidecar, caught: Catchers) -> None:
    status, _headers, body = via_route(deny_by_default, "/other/x")
    assert (status, body) == (200, b"caught 1.1.1.1:443")
    caught.barrier()
    assert [c.sni for c in caught.connections()] == ["other.test"]


def test_non_loopback_listener_needs_the_explicit_setting_and_warns(
    sealed_network: None, ca_file: str, tmp_path: Path
) -> None:
    config = base_config(ca_file)
    config["listen"]["host"] = "0.0.0.0"
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(config))
    refused = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)],
                             check=False, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert refused.returncode == 2 and "listen.allow_non_loopback" in refused.stderr

    config["listen"]["allow_non_loopback"] = True
    sidecar = start_sidecar(tmp_path, config)
    try:
        warning = sidecar.wait_log(lambda e: e.get("event") == "insecure_setting")
        assert warning["level"] == "warning" and "other pods can use this sidecar" in warning["message"]
    finally:
        sidecar.terminate()
