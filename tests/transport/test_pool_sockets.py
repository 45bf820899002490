"""HTTP11Transport's pool: limits, waiting, release on abort, expiry, stale idle, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import random
import sys

import httpx
import pytest

from sidecar.upstream.transport.connection import HIGH_WATER
from tests.servers.loop_upstream import (
    Certs,
    Upstream,
    big_body_sha256,
    rss_bytes,
    run,
    seeded_bytes,
    wait_for,
)
from tests.transport.helpers import certs, fetch, make_request, server, transport_for

__all__ = ["certs", "server"]  # fixtures used by name below


def test_pool_limit_holds_under_64_concurrent_requests(certs: Certs, server: Upstream) -> None:
    async def main() -> list[int]:
        transport = transport_for(certs, max_connections=8)
        seen_active: list[int] = []

        async def one() -> int:
            response, body = await fetch(transport, make_request("GET", server.url("/delay/20")))
            seen_active.append(transport.pool_stats()[0])
            assert body == b"ok"
            return response.status_code

        statuses = await asyncio.gather(*(one() for _ in range(64)))
        assert max(seen_active) <= 8
        assert transport.connections_opened <= 8
        await transport.aclose()
        return statuses

    assert run(main()) == [200] * 64
    assert server.max_open <= 8 and server.connections <= 8


def test_pool_timeout_when_every_slot_stays_busy(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1, salvage_timeout=0.3)
        holder = asyncio.create_task(transport.handle_async_request(make_request("GET", server.url("/stall"))))
        await wait_for(lambda: server.requests == 1, what="the request to reach the upstream")
        with pytest.raises(httpx.PoolTimeout):
            await transport.handle_async_request(make_request("GET", server.url("/"), timeouts={"pool": 0.2}))
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        # The request was sent: the salvage keeps the slot until it gives up on the stalled
        # upstream (salvage_timeout), then frees it.
        await wait_for(lambda: transport.pool_stats() == (0, 0), timeout=2, what="the salvage to give up")
        _, body = await fetch(transport, make_request("GET", server.url("/bytes/10"), timeouts={"pool": 0.5}))
        assert body == seeded_bytes(10)
        await transport.aclose()

    run(main())


def test_waiter_is_handed_the_released_connection_and_reports_its_wait(certs: Certs, server: Upstream) -> None:
    async def main() -> httpx.Response:
        transport = transport_for(certs, max_connections=1)
        first = asyncio.create_task(fetch(transport, make_request("GET", server.url("/delay/150"))))
        await wait_for(lambda: transport.pool_stats() == (1, 0), what="the slot to be taken")
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        await first
        assert body == seeded_bytes(10)
        await transport.aclose()
        return response

    response = run(main())
    assert response.extensions["egress.reused"] is True
    assert response.extensions["egress.pool_wait"] > 0.05
    assert server.connections == 1


def test_waiter_for_another_origin_takes_the_slot_of_an_idle_connection(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert transport.pool_stats() == (0, 1)
        # Same server, other origin (host name): the idle 127.0.0.1 connection makes way.
        _, body = await fetch(transport, make_request("GET", server.url("/bytes/10", host="localhost"),
                                                      timeouts={"pool": 0.5}))
        assert body == seeded_bytes(10)
        assert transport.pool_stats() == (0, 1)
        await transport.aclose()

    run(main())
    assert server.connections == 2


def test_aborted_downloads_close_their_connection_and_free_the_slot(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=2)
        for _ in range(10):
            response = await transport.handle_async_request(make_request("GET", server.url(f"/big/{8 << 20}")))
            async for _chunk in response.aiter_raw():
                break  # the client went away half-way
            await response.aclose()
            assert transport.pool_stats() == (0, 0)
        for _ in range(20):
            _, body = await fetch(transport, make_request("GET", server.url("/bytes/10"), timeouts={"pool": 0.5}))
            assert body == seeded_bytes(10)
        await transport.aclose()

    run(main())
    assert server.connections == 11  # ten aborted ones, then one reused for the 20


def test_response_dropped_without_close_gives_its_slot_back(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        response = await transport.handle_async_request(make_request("GET", server.url(f"/big/{4 << 20}")))
        assert transport.pool_stats() == (1, 0)
        del response  # neither read to the end nor closed: a caller's bug
        gc.collect()
        assert transport.pool_stats() == (0, 0)
        _, body = await fetch(transport, make_request("GET", server.url("/bytes/10"), timeouts={"pool": 0.5}))
        assert body == seeded_bytes(10)
        await transport.aclose()

    run(main())


def test_cancelled_request_waiting_for_headers_frees_its_slot_when_the_salvage_gives_up(
    certs: Certs, server: Upstream
) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1, salvage_timeout=0.3)
        task = asyncio.create_task(transport.handle_async_request(make_request("GET", server.url("/stall"))))
        await wait_for(lambda: server.requests == 1, what="the request to reach the upstream")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert transport.pool_stats() == (1, 0)  # salvaging: the slot stays taken
        await wait_for(lambda: transport.pool_stats() == (0, 0), timeout=2, what="the salvage to give up")
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        assert transport.connections_abandoned == (0, 1)
        await transport.aclose()

    run(main())


def test_idle_connections_expire_after_keepalive_expiry(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, keepalive_expiry=0.2)
        await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert transport.pool_stats() == (0, 1)
        await wait_for(lambda: transport.pool_stats() == (0, 0), what="the idle connection to expire")
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        response, _ = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert response.extensions["egress.reused"] is False
        assert transport.connections_opened == 2
        await transport.aclose()

    run(main())


def test_idle_connection_closed_by_the_server_is_not_reused(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        await fetch(transport, make_request("GET", server.url("/close-after")))
        # The server closes the idle keep-alive connection; the pool notices by itself.
        await wait_for(lambda: transport.pool_stats() == (0, 0), what="the pool to drop the closed connection")
        response, body = await fetch(transport, make_request("POST", server.url("/upload"), content=b"once"))
        assert response.status_code == 200 and b'"length": 4' in body
        assert response.extensions["egress.reused"] is False
        await transport.aclose()

    run(main())
    assert server.connections == 2


def test_slow_reader_of_100_mib_keeps_buffered_bytes_and_rss_bounded(certs: Certs, server: Upstream) -> None:
    total = 100 << 20
    bound = HIGH_WATER + (256 << 10)  # the high-water mark plus one socket read

    async def main() -> tuple[str, int, int]:
        transport = transport_for(certs)
        baseline = rss_bytes()
        peak_rss = baseline
        response = await transport.handle_async_request(make_request("GET", server.url(f"/big/{total}")))
        conn = response.stream._conn  # type: ignore[attr-defined]
        digest = hashlib.sha256()
        received = 0
        next_check = 0
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
            if received >= next_check and received < total:
                # Stop consuming until the transport has stopped reading the socket: if
                # backpressure did not work, the buffer would grow past the bound instead.
                await wait_for(lambda: conn.reading_paused or conn.body_done, what="reading to pause")
                assert conn.buffered <= bound
                peak_rss = max(peak_rss, rss_bytes())
                next_check += 10 << 20
        assert received == total
        await transport.aclose()
        return digest.hexdigest(), conn.max_buffered, peak_rss - baseline

    digest, max_buffered, rss_growth = run(main(), timeout=120)
    assert digest == big_body_sha256(total)
    assert max_buffered <= bound
    assert rss_growth < 16 << 20, f"RSS grew by {rss_growth >> 20} MiB"


def test_aclose_closes_idle_connections_and_refuses_new_requests(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        await fetch(transport, make_request("GET", server.url("/bytes/10")))
        await transport.aclose()
        assert transport.pool_stats() == (0, 0)
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(make_request("GET", server.url("/")))

    run(main())


def test_slot_accounting_survives_a_mix_of_aborts_cancels_failures_and_origins(
    certs: Certs, server: Upstream
) -> None:
    """300 requests, 48 at a time through 6 slots, over two origins; a third of them end badly."""
    rng = random.Random(int(os.environ.get("TRANSPORT_STRESS_SEED", "7")))
    kinds = ["ok", "ok", "ok", "abort", "cancel", "timeout", "disconnect", "drop", "reset-mid"]

    async def main() -> None:
        transport = transport_for(certs, max_connections=6)
        semaphore = asyncio.Semaphore(48)

        async def one(kind: str, host: str) -> None:
            async with semaphore:
                timeouts = {"pool": 10.0, "read": 0.2 if kind == "timeout" else 5.0}
                path = {"ok": "/bytes/300", "abort": f"/big/{4 << 20}", "cancel": "/stall", "timeout": "/stall",
                        "disconnect": "/disconnect", "drop": "/drop-next", "reset-mid": "/reset-mid-body"}[kind]
                request = make_request("GET", server.url(path, host=host), timeouts=timeouts)
                if kind == "cancel":
                    task = asyncio.create_task(transport.handle_async_request(request))
                    await asyncio.sleep(rng.random() * 0.02)  # cancel at a random point of the exchange
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        response = await task
                        await response.aclose()
                    return
                try:
                    response = await transport.handle_async_request(request)
                    async for _chunk in response.aiter_raw():
                        if kind == "abort":
                            break
                    await response.aclose()
                except httpx.HTTPError:
                    assert kind in ("timeout", "disconnect", "reset-mid"), (kind, repr(sys.exc_info()[1]), sys.exc_info()[1].__cause__)

        jobs = [one(rng.choice(kinds), rng.choice(["127.0.0.1", "localhost"])) for _ in range(300)]
        await asyncio.gather(*jobs)
        # Cancelled requests on /stall are salvaged until the salvage's deadline (1 s).
        await wait_for(lambda: transport.pool_stats()[0] == 0, timeout=3, what="salvages to end")
        active, idle = transport.pool_stats()
        assert active == 0 and idle <= 6
        pool = transport._pool
        assert pool.total == idle == sum(len(o.idle) for o in pool.origins.values())
        assert sum(o.connections for o in pool.origins.values()) == pool.total
        # Every slot is usable again: a burst on both origins succeeds without a pool timeout.
        finals = [fetch(transport, make_request("GET", server.url("/bytes/10", host=host), timeouts={"pool": 2.0}))
                  for host in ["127.0.0.1", "localhost"] * 12]
        for _, body in await asyncio.gather(*finals):
            assert body == seeded_bytes(10)
        await transport.aclose()

    run(main(), timeout=90)


def test_origins_without_connections_are_forgotten_past_the_cap(certs: Certs) -> None:
    """An app in forward-proxy form can name endless hosts: the origin table stays bounded."""

    class Denied(Exception):
        pass

    async def deny(host: str, port: int) -> list[str]:
        raise Denied(host)

    async def main() -> int:
        transport = transport_for(certs, resolve=deny)
        for index in range(5000):
            with pytest.raises(Denied):
                await transport.handle_async_request(make_request("GET", f"https://h{index}.test/"))
        await transport.aclose()
        return len(transport._pool.origins)

    assert run(main()) <= 4096
