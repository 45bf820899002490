"""HTTP/2 to upstreams per route: spoken on the wire, streams share a connection, GOAWAY survived."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar
from tests.servers.nginx import NginxUpstream


def routes(server: NginxUpstream, **h2: Any) -> list[dict[str, Any]]:
    base = f"https://localhost:{server.port}"
    return [{"name": "h2", "prefix": "/h2", "upstream": base, "http2": True, **h2},
            {"name": "h1", "prefix": "/h1", "upstream": base}]


def test_http2_route_speaks_http2_and_the_default_stays_http1(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx()
    sidecar = make_sidecar(routes=routes(server))
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        h2 = client.get("/h2/hello")
        h1 = client.get("/h1/hello")
    assert (h2.status_code, h2.text) == (200, "hello HTTP/2.0\n")
    assert h2.http_version == "HTTP/1.1"  # the app side is always HTTP/1.1
    assert (h1.status_code, h1.text) == (200, "hello HTTP/1.1\n")
    assert [entry.protocol for entry in server.logged()] == ["HTTP/2.0", "HTTP/1.1"]


def test_concurrent_requests_share_one_http2_connection(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx()
    sidecar = make_sidecar(routes=routes(server))
    url = f"{sidecar.url}/h2/slow"
    assert httpx.get(f"{sidecar.url}/h2/hello", trust_env=False, timeout=15).status_code == 200  # connection up
    start = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: httpx.get(url, trust_env=False, timeout=30), range(20)))
    elapsed = time.monotonic() - start
    assert [(r.status_code, len(r.content)) for r in responses] == [(200, 32768)] * 20
    logged = server.logged()
    assert {entry.protocol for entry in logged} == {"HTTP/2.0"}
    assert len({entry.connection for entry in logged}) == 1  # 21 streams, one TCP+TLS connection
    assert max(entry.connection_requests for entry in logged) == 21
    # Each response is rate-limited to ~1 s: one after another would take ~20 s.
    assert elapsed < 8, elapsed


# nginx sends GOAWAY *before* the response of the last stream it accepts on a connection, and
# ignores the streams above it. The transport finishes the streams at or below the GOAWAY's last
# stream id and sends the others again on a new connection (sidecar/upstream/transport/h2_transport.py),
# so no retry budget is needed.
@pytest.mark.parametrize("mode", ["sequential", "concurrent"])
def test_goaway_after_keepalive_requests_loses_no_request(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream], mode: str
) -> None:
    server = nginx(keepalive_requests=2)  # nginx sends GOAWAY on every second stream
    sidecar = make_sidecar(routes=routes(server))
    url = f"{sidecar.url}/h2/hello"
    if mode == "sequential":
        with httpx.Client(trust_env=False, timeout=15) as client:
            responses = [client.get(url) for _ in range(10)]
    else:
        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(lambda _: httpx.get(url, trust_env=False, timeout=15), range(10)))
    assert [(r.status_code, r.text) for r in responses] == [(200, "hello HTTP/2.0\n")] * 10
    logged = server.logged()
    assert all(entry.connection_requests <= 2 for entry in logged)
    assert len({entry.connection for entry in logged}) >= 5  # GOAWAY really ended connections


def test_stream_reset_before_headers_is_retried_for_get_not_post(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx()
    sidecar = make_sidecar(routes=routes(server, retries={"attempts": 2, "backoff_base": "1ms"}))
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        get = client.get("/h2/rst")
        assert (get.status_code, get.headers["x-egress-error"]) == (502, "upstream_reset")
        assert [(e.method, e.status) for e in server.logged()] == [("GET", 444)] * 3  # 1 try + 2 retries
        post = client.post("/h2/rst", content=b"x")
        assert (post.status_code, post.headers["x-egress-error"]) == (502, "upstream_reset")
        assert [e.method for e in server.logged()].count("POST") == 1
        assert client.get("/h2/hello").status_code == 200  # the connection survived the resets
    assert len({e.connection for e in server.logged()}) == 1
