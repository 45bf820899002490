"""The egress inventory at admin /destinations, through the real sidecar: exact counts after a
known mix of route, forward-proxy, would-deny (report mode) and denied requests; the bound."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import Sidecar, server_context
from tests.upstream import Upstream, UpstreamServer


@pytest.fixture
def named_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    """A TLS upstream whose certificate also names the test's forward-proxy hosts."""
    server = UpstreamServer(server_context(ca, "localhost", "upstream.test", "blocked.test"))
    yield server.start()
    server.stop()


def destinations(sidecar: Sidecar) -> dict[str, Any]:
    response = httpx.get(f"{sidecar.admin_url}/destinations", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()  # type: ignore[no-any-return]


def by_key(inventory: dict[str, Any]) -> dict[tuple[str, int, str, str | None], dict[str, Any]]:
    return {(d["host"], d["port"], d["via"], d["route"]): d for d in inventory["destinations"]}


def test_destinations_count_exactly_what_went_through(
    make_sidecar: Callable[..., Sidecar], named_upstream: Upstream
) -> None:
    port = named_upstream.port
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{port}"}],
        # upstream.test resolves to the loopback upstream, which allow_cidrs admits: only the host
        # rules refuse it, so report mode forwards it as a would-deny.
        policy={"mode": "report", "default": "deny", "allow_hosts": ["localhost"], "deny_hosts": ["blocked.test"],
                "allow_cidrs": ["127.0.0.0/8"]},
        resolve={"upstream.test": "127.0.0.1", "blocked.test": "127.0.0.1"},
    )
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=10) as client:
        for _ in range(3):
            assert client.get("/up/bytes?n=100").status_code == 200
        assert client.post("/up/echo", content=b"x" * 50).status_code == 200
        assert client.get("/up/status/503").status_code == 503
    with sidecar.client(timeout=10) as proxied:
        assert proxied.get(f"http://localhost:{port}/bytes?n=10").status_code == 200
        assert proxied.get(f"http://upstream.test:{port}/bytes?n=7").status_code == 200
        assert proxied.put(f"http://upstream.test:{port}/echo", content=b"abc").status_code == 200
        # In report mode a deny-listed name is forwarded too (would-deny host_denied) ...
        assert proxied.get(f"http://blocked.test:{port}/bytes?n=1").status_code == 200
        # ... but never an address rule: the sidecar's own admin port is refused.
        denied = proxied.get(f"http://0x7f.1:{sidecar.admin_port}/config")
        assert denied.headers["x-egress-error"] == "denied_ip"
    inventory = destinations(sidecar)
    assert (inventory["max_entries"], inventory["evicted"], inventory["entries"]) == (2000, 0, 5)
    shown = by_key(inventory)
    assert set(shown) == {
        ("localhost", port, "route", "up"), ("localhost", port, "forward-proxy", None),
        ("upstream.test", port, "forward-proxy", None), ("blocked.test", port, "forward-proxy", None),
        ("0x7f.1", sidecar.admin_port, "forward-proxy", None),
    }
    route = shown[("localhost", port, "route", "up")]
    assert (route["requests"], route["methods"], route["status"]) == (5, {"GET": 4, "POST": 1},
                                                                      {"2xx": 4, "5xx": 1})
    assert (route["bytes_sent"], route["denied"], route["would_deny"]) == (50, 0, 0)
    assert route["bytes_received"] > 300  # 3 x 100 bytes, the echo's JSON and the 503's body
    plain = shown[("localhost", port, "forward-proxy", None)]
    assert (plain["requests"], plain["bytes_received"], plain["would_deny"]) == (1, 10, 0)
    would = shown[("upstream.test", port, "forward-proxy", None)]
    assert (would["requests"], would["methods"], would["would_deny"], would["would_deny_reasons"]) == (
        2, {"GET": 1, "PUT": 1}, 2, {"not_allowed": 2})
    assert would["bytes_sent"] == 3 and would["first_seen"] <= would["last_seen"]
    blocked = shown[("blocked.test", port, "forward-proxy", None)]
    assert (blocked["would_deny_reasons"], blocked["denied"]) == ({"host_denied": 1}, 0)
    refused = shown[("0x7f.1", sidecar.admin_port, "forward-proxy", None)]
    assert (refused["denied"], refused["denied_reasons"], refused["status"], refused["would_deny"]) == (
        1, {"listener": 1}, {"4xx": 1}, 0)
    assert inventory["destinations"][0]["host"] == "0x7f.1"  # most recently seen first, as the app named it


def test_the_bound_evicts_the_least_recently_seen(make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream) -> None:
    port = fresh_upstream.port
    sidecar = make_sidecar(inventory={"max_entries": 2},
                           resolve={"a.test": "127.0.0.1", "b.test": "127.0.0.1", "c.test": "127.0.0.1"},
                           policy={"deny_hosts": ["a.test", "b.test", "c.test"]})
    with sidecar.client(timeout=10) as proxied:
        for host in ("a.test", "b.test", "a.test", "c.test"):
            assert proxied.get(f"http://{host}:{port}/").status_code == 403
    inventory = destinations(sidecar)
    assert [d["host"] for d in inventory["destinations"]] == ["c.test", "a.test"]
    assert (inventory["evicted"], inventory["entries"]) == (1, 2)
    assert inventory["destinations"][1]["denied"] == 2
