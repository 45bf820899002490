"""The egress inventory at admin /destinations, through the real sidecar: exact counts after a
known mix of route, forward-proxy, would-deny (report mode) and denied requests; the bound."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import Sidecar, server_context
from tests.servers.upstream import Upstream, UpstreamServer


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


def tunnel_get(sidecar: Sidecar, authority: str, host: str, ca_file: str) -> int:
    """CONNECT through the sidecar, then a real TLS GET over the tunnel; returns the status."""
    import ssl

    from tests.e2e.connect_support import connect, read_head

    sock, status, _headers, _rest = connect(sidecar.port, authority)
    if status != 200:
        sock.close()
        return status
    context = ssl.create_default_context(cafile=ca_file)
    with context.wrap_socket(sock, server_hostname=host) as tls:
        tls.sendall(f"GET /bytes?n=64 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        code, _h, body = read_head(tls)
        while len(body) < 64:
            chunk = tls.recv(65536)
            if not chunk:
                break
            body += chunk
    return code


def test_tunnels_are_in_the_inventory_and_report_mode_applies_to_them(
    make_sidecar: Callable[..., Sidecar], named_upstream: Upstream, ca_file: str
) -> None:
    port = named_upstream.port
    sidecar = make_sidecar(
        policy={"mode": "report", "default": "deny", "allow_hosts": ["localhost"], "allow_cidrs": ["127.0.0.0/8"],
                "connect_ports": [port]},
        resolve={"upstream.test": "127.0.0.1"},
    )
    assert tunnel_get(sidecar, f"localhost:{port}", "localhost", ca_file) == 200
    assert tunnel_get(sidecar, f"upstream.test:{port}", "upstream.test", ca_file) == 200  # a would-deny
    assert tunnel_get(sidecar, "upstream.test:8443", "upstream.test", ca_file) == 403  # port: refused in any mode

    def tunnels() -> dict[tuple[str, int, str, str | None], dict[str, Any]] | None:
        shown = {key: d for key, d in by_key(destinations(sidecar)).items() if key[2] == "tunnel"}
        done = len(shown) == 3 and all(d["bytes_received"] for k, d in shown.items() if k[1] == port)
        return shown if done else None

    from tests.servers.upstream import wait_until

    shown = wait_until(tunnels, 10, message="three tunnel entries, both open tunnels closed")
    allowed = shown[("localhost", port, "tunnel", None)]
    assert (allowed["requests"], allowed["methods"], allowed["would_deny"], allowed["denied"]) == (
        1, {"CONNECT": 1}, 0, 0)
    assert allowed["bytes_sent"] > 100 and allowed["bytes_received"] > 64  # TLS both ways
    would = shown[("upstream.test", port, "tunnel", None)]
    assert (would["would_deny"], would["would_deny_reasons"], would["status"]) == (1, {"not_allowed": 1},
                                                                                   {"2xx": 1})
    refused = shown[("upstream.test", 8443, "tunnel", None)]
    assert (refused["denied"], refused["denied_reasons"], refused["status"]) == (1, {"port": 1}, {"4xx": 1})
    metrics = httpx.get(f"{sidecar.admin_url}/metrics", timeout=5).text
    assert f'egress_would_deny_total{{reason="not_allowed",upstream="upstream.test:{port}"}} 1.0' in metrics
    line = sidecar.wait_log(lambda e: e.get("event") == "tunnel" and e.get("decision") == "would_deny")
    assert (line["reason"], line["upstream"]) == ("not_allowed", f"upstream.test:{port}")
