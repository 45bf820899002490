"""The sidecar on HTTP11Transport: TLS handshakes bounded by the pool, whatever the load."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Sidecar
from tests.prometheus import samples, scrape, total
from tests.servers.upstream import Upstream, random_bytes, wait_until


def test_upstream_tls_handshakes_never_exceed_the_pool_size(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}],
        pool={"max_connections": 4, "max_keepalive_connections": 4},
        timeouts={"pool": "10s"},
    )

    async def load() -> list[bytes]:
        # 400 requests, 32 at a time, from 32 client connections: 8x the upstream pool.
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            semaphore = asyncio.Semaphore(32)

            async def one() -> bytes:
                async with semaphore:
                    response = await client.get(f"{sidecar.url}/up/bytes?n=100")
                    assert response.status_code == 200, response.text
                    return response.content

            return await asyncio.gather(*(one() for _ in range(400)))

    bodies = asyncio.run(load())
    assert bodies == [random_bytes(100, 1)] * 400
    # asyncio's TLS server runs the handler only after the handshake: one per connection.
    assert 1 <= fresh_upstream.connections <= 4, fresh_upstream.connections


POOL = 4
ROUNDS = 5


def _active_connections(sidecar: Sidecar) -> float:
    return total(samples(scrape(sidecar.admin_url)), "egress_upstream_connections", state="active")


def test_apps_disconnecting_while_waiting_do_not_cost_new_upstream_handshakes(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    """As wrk stopping with requests in flight: each round, 3x the pool of apps send a request
    to a slow upstream (0.3 s to the head) and disconnect while the first ones wait for it (the
    rest wait for a slot). The sidecar reads the abandoned responses and keeps the connections.
    (Rounds do not overlap: with requests queued for a slot, a salvage gives the slot up after
    SALVAGE_CONTENDED instead, tests/transport/test_salvage.py.)"""
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}],
        pool={"max_connections": POOL, "max_keepalive_connections": POOL},
        timeouts={"pool": "10s"},
    )
    request = f"GET /up/delay?s=0.3 HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n\r\n".encode()
    for _ in range(ROUNDS):
        before = len(fresh_upstream.requests)
        apps = [socket.create_connection(("127.0.0.1", sidecar.port)) for _ in range(3 * POOL)]
        try:
            for app in apps:
                app.sendall(request)
            # Every slot carries a request the upstream is sitting on; the other apps wait.
            wait_until(lambda: len(fresh_upstream.requests) >= before + POOL, timeout=10,  # noqa: B023
                       message="a request on every pooled connection")
        finally:
            for app in apps:
                app.close()
        wait_until(lambda: _active_connections(sidecar) == 0, timeout=5, message="the round's salvages done")
    # Each app that left is still logged as a 499 client_disconnected, as before.
    wait_until(lambda: sum(1 for e in sidecar.logs() if e.get("kind") == "client_disconnected"
                           and e.get("status") == 499) >= ROUNDS * 3 * POOL,
               timeout=10, message="a 499 client_disconnected line per app")
    # The pool is free again once the abandoned responses were read.
    wait_until(lambda: _active_connections(sidecar) == 0, timeout=5, message="no active upstream connection")

    # Later requests succeed, on the connections kept.
    with httpx.Client(timeout=10) as client:
        for _ in range(2 * POOL):
            response = client.get(f"{sidecar.url}/up/bytes?n=100")
            assert response.status_code == 200 and response.content == random_bytes(100, 1)
    # The upstream's count of TLS handshakes (its handler runs once a handshake completed).
    assert fresh_upstream.connections <= POOL, fresh_upstream.connections
    found = samples(scrape(sidecar.admin_url))
    assert total(found, "egress_upstream_connections_opened_total", route="up") <= POOL
    assert total(found, "egress_requests_on_reused_connection_total", route="up") >= 2 * POOL
    # Each round, the requests on the wire were salvaged (the apps still waiting for a slot
    # never had a connection).
    assert total(found, "egress_upstream_abandoned_total", outcome="kept") >= ROUNDS * POOL


@pytest.mark.parametrize("path", ["/up/slow?n=400&interval=0.005", "/up/slow?n=400&interval=0.005&chunked=1"])
def test_an_app_leaving_mid_download_still_gets_its_upstream_connection_closed(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, path: str
) -> None:
    """400 KiB left is far past what salvage reads (64 KiB): the connection is closed, its slot
    freed. The upstream trickles the body (1 KiB every 5 ms): a body sent at once can fit in the
    sockets' buffers whole, and the sidecar would rightly finish the response before the app
    leaves (it did, 1 run in ~10, with 4 MiB on loopback)."""
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}],
        pool={"max_connections": 1, "max_keepalive_connections": 1},
        timeouts={"pool": "2s"},
    )
    with httpx.stream("GET", f"{sidecar.url}{path}", timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            assert chunk
            break
    wait_until(lambda: fresh_upstream.open_connections == 0, timeout=5, message="the upstream to see the close")
    wait_until(lambda: _active_connections(sidecar) == 0, timeout=5, message="the slot to be freed")
    sidecar.wait_log(lambda e: e.get("kind") == "client_disconnected")
    response = httpx.get(f"{sidecar.url}/up/bytes?n=100", timeout=10)
    assert response.status_code == 200 and response.content == random_bytes(100, 1)
    assert fresh_upstream.connections == 2  # the abandoned one was closed, not reused
    found = samples(scrape(sidecar.admin_url))
    assert total(found, "egress_upstream_abandoned_total", pool="default", outcome="closed") == 1
    assert total(found, "egress_upstream_abandoned_total", outcome="kept") == 0
