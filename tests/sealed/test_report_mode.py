"""Report mode in the sealed namespace: host-rule refusals are forwarded and reported, and every
SSRF vector of the policy table is still refused with zero connections caught.

With `default: deny` and `mode: report`, a host outside `allow_hosts` reaches its catcher (it
resolves, statically, to 1.1.1.1), its access line says `"decision": "would_deny"` with the
reason, and `egress_would_deny_total{upstream,reason}` counts it. The address rules do not
relax: each vector of tests/sealed/test_ssrf.py that is refused for its address, its name's
answer or the sidecar's own listener is refused exactly as in enforce mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar, base_config, start_sidecar
from tests.sealed.catchers import Catchers
from tests.sealed.dns import DNSServer
from tests.sealed.test_ssrf import SIDECAR_CONFIG, VECTORS, Vector, assert_denied, error_lines, forward
from tests.servers.upstream import wait_until

# Refusals by the host rules are what report mode forwards; every other vector must still be refused.
HOST_RULES = {"host_denied", "not_allowed"}
ADDRESS_VECTORS = [v for v in VECTORS if v.reason not in HOST_RULES]


@pytest.fixture(scope="module", params=["httptools", "h11"])
def reporting(
    request: pytest.FixtureRequest, system_resolver: None, ca_file: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    config = base_config(ca_file, **SIDECAR_CONFIG)
    config["policy"] = {**SIDECAR_CONFIG["policy"], "mode": "report", "default": "deny",
                        "allow_hosts": ["public.test"], "deny_hosts": ["*.blocked.test", "exact.test"]}
    config["resolve"] = {**SIDECAR_CONFIG["resolve"], "other.test": "1.1.1.1", "exact.test": "1.1.1.1"}
    config["listen"]["http"] = request.param
    started = start_sidecar(tmp_path_factory.mktemp("report"), config)
    yield started
    started.terminate()


def would_deny_count(sidecar: Sidecar, upstream: str, reason: str) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics", timeout=5).text
    wanted = f'egress_would_deny_total{{reason="{reason}",upstream="{upstream}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


def test_address_vectors_are_left_after_the_host_rule_ones() -> None:
    assert len(ADDRESS_VECTORS) >= 30 and len(VECTORS) - len(ADDRESS_VECTORS) == 2


@pytest.mark.parametrize("vector", ADDRESS_VECTORS, ids=[v.id for v in ADDRESS_VECTORS])
def test_ssrf_vector_is_still_refused_in_report_mode_and_nothing_connects(
    reporting: Sidecar, caught: Catchers, dns: DNSServer, vector: Vector
) -> None:
    before = len(error_lines(reporting))
    assert_denied(reporting, caught, forward(reporting, vector.url), vector.status, vector.kind, vector.reason,
                  before)


def access_lines(sidecar: Sidecar, host: str) -> list[dict[str, Any]]:
    return [e for e in sidecar.logs() if e.get("event") == "access" and e.get("upstream") == f"{host}:443"]


@pytest.mark.parametrize(("host", "reason"), [("other.test", "not_allowed"), ("exact.test", "host_denied")])
def test_a_host_the_rules_refuse_is_forwarded_logged_and_counted(
    reporting: Sidecar, caught: Catchers, dns: DNSServer, host: str, reason: str
) -> None:
    before_count = would_deny_count(reporting, f"{host}:443", reason)
    before_lines = len(access_lines(reporting, host))
    status, headers, body = forward(reporting, f"http://{host}/report")
    assert (status, body) == (200, b"caught 1.1.1.1:443"), headers
    caught.barrier()
    assert [(c.address, c.sni) for c in caught.connections()] == [("1.1.1.1", host)]
    line = wait_until(lambda: access_lines(reporting, host)[before_lines:] or None, 5, message="access line")[0]
    assert (line["decision"], line["reason"], line["status"]) == ("would_deny", reason, 200)
    assert wait_until(lambda: would_deny_count(reporting, f"{host}:443", reason) == before_count + 1, 5)


def test_an_allowed_host_is_not_reported(reporting: Sidecar, caught: Catchers, dns: DNSServer) -> None:
    before = len(access_lines(reporting, "public.test"))
    status, _headers, body = forward(reporting, "http://public.test/")
    assert (status, body) == (200, b"caught 1.1.1.1:443")
    line = wait_until(lambda: access_lines(reporting, "public.test")[before:] or None, 5, message="access line")[0]
    assert "decision" not in line and "reason" not in line
