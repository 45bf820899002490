"""The sidecar on HTTP11Transport: TLS handshakes bounded by the pool, whatever the load."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from tests.conftest import Sidecar
from tests.upstream import Upstream, random_bytes


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
