"""Answers and series as the README documents them: denial reasons seeded at 0 by their real
names, IPv6 upstreams labelled `[::1]:port`."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from sidecar.policy.egress import REASONS
from tests.conftest import Sidecar, free_port, server_context
from tests.servers.upstream import Upstream, UpstreamServer


def denied_series(sidecar: Sidecar) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{sidecar.admin_url}/metrics").text
    return {(s.labels["route"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "egress_denied"
            for s in family.samples if s.name == "egress_denied_total"}


def test_denied_reasons_are_seeded_at_zero_by_their_real_names(make_sidecar: Callable[..., Sidecar]) -> None:
    sidecar = make_sidecar(policy={"allow_cidrs": []})
    assert denied_series(sidecar) == {("-", reason): 0.0 for reason in REASONS}
    # The first loopback denial raises the series that was already there.
    response = httpx.get("http://127.0.0.1:9/", proxy=sidecar.url, trust_env=False)
    assert (response.status_code, response.headers["x-egress-error"]) == (403, "denied_ip")
    assert denied_series(sidecar)[("-", "loopback")] == 1.0


@pytest.fixture
def v6_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    server = UpstreamServer(server_context(ca, "::1", "localhost"), host="::1")
    yield server.start()
    server.stop()


def test_ipv6_upstream_is_labelled_in_brackets(make_sidecar: Callable[..., Sidecar], v6_upstream: Upstream) -> None:
    where = f"[::1]:{v6_upstream.port}"
    closed = f"[::1]:{free_port()}"  # nothing listens there: the error line names it
    sidecar = make_sidecar(routes=[{"name": "v6", "prefix": "/v6", "upstream": f"https://{where}",
                                    "circuit_breaker": {"consecutive_failures": 5}},
                                   {"name": "v6-closed", "prefix": "/v6-closed", "upstream": f"https://{closed}"}])
    assert httpx.get(f"{sidecar.url}/v6/echo", trust_env=False).status_code == 200
    assert httpx.get(f"{sidecar.url}/v6-closed/x", trust_env=False).status_code == 502
    error = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("route") == "v6-closed")
    assert error["upstream"] == closed and error["detail"].startswith(f"{closed}: "), error
    line = sidecar.wait_log(lambda e: e.get("event") == "access" and e.get("route") == "v6")
    assert line["upstream"] == where
    text = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert f'upstream="{where}"' in text and f'upstream="::1:{v6_upstream.port}"' not in text
    assert f'egress_circuit_state{{upstream="{where}"}} 0.0' in text
