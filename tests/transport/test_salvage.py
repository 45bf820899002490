"""HTTP11Transport keeps a connection whose caller went away, when the rest of its response is
small and comes soon (salvage.py); otherwise it closes it, as before. Real TLS upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from sidecar.upstream.transport import HTTP11Transport
from tests.servers.loop_upstream import Certs, Upstream, run, seeded_bytes, wait_for
from tests.transport.helpers import certs, fetch, make_request, server, transport_for

__all__ = ["certs", "server"]  # fixtures used by name below


async def _cancel_waiting_requests(
    transport: HTTP11Transport, server: Upstream, path: str, count: int, on_the_wire: int, method: str = "GET"
) -> None:
    """Start `count` requests, wait until `on_the_wire` of them reached the upstream (the rest
    wait for a slot), then cancel them all, as the forward path does when the apps go away."""
    before = server.requests
    tasks = [asyncio.create_task(transport.handle_async_request(make_request(method, server.url(path))))
             for _ in range(count)]
    await wait_for(lambda: server.requests >= before + on_the_wire, what="requests to reach the upstream")
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    # The callers see their cancellation at once: nothing waited for the responses.
    assert all(isinstance(result, asyncio.CancelledError) for result in results), results


def test_connections_of_cancelled_requests_are_kept_and_no_new_handshake_is_needed(
    certs: Certs, server: Upstream
) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=2)
        for _ in range(5):
            await _cancel_waiting_requests(transport, server, "/delay/100", count=6, on_the_wire=2)
            # While the responses are read, the salvaged connections keep their slots.
            active, idle = transport.pool_stats()
            assert active + idle == 2 and active >= 1, (active, idle)
            await wait_for(lambda: transport.pool_stats() == (0, 2), what="the salvaged connections to go idle")
        assert transport.connections_abandoned == (10, 0)
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10) and response.extensions["egress.reused"] is True
        assert transport.connections_opened == 2
        await transport.aclose()

    run(main())
    assert server.connections == 2


def test_a_salvaged_connection_goes_to_the_waiting_request_at_once(certs: Certs, server: Upstream) -> None:
    # The waiter queued below lets the salvage run its course (salvage_contended: 2 s, past the
    # 150 ms the rest takes), so the connection is handed over when the rest is in.
    async def main() -> httpx.Response:
        transport = transport_for(certs, max_connections=1, salvage_contended=2.0)
        await _cancel_waiting_requests(transport, server, "/delay/150", count=1, on_the_wire=1)
        assert transport.pool_stats() == (1, 0)
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10)
        await transport.aclose()
        return response

    response = run(main())
    assert response.extensions["egress.reused"] is True
    assert server.connections == 1


def test_a_cancelled_head_request_is_salvaged(certs: Certs, server: Upstream) -> None:
    async def main() -> tuple[int, int]:
        transport = transport_for(certs, max_connections=1)
        await _cancel_waiting_requests(transport, server, "/delay/50", count=1, on_the_wire=1, method="HEAD")
        await wait_for(lambda: transport.pool_stats() == (0, 1), what="the connection to go idle")
        await fetch(transport, make_request("GET", server.url("/bytes/10")))
        await transport.aclose()
        return transport.connections_abandoned

    assert run(main()) == (1, 0)
    assert server.connections == 1


def test_a_request_cancelled_mid_upload_is_closed_at_once(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        forever = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 1000
            await forever.wait()  # the app never sends the rest
            yield b"never"

        request = make_request("POST", server.url("/upload"), stream=body())
        task = asyncio.create_task(transport.handle_async_request(request))
        await wait_for(lambda: server.requests == 1, what="the request head to reach the upstream")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Half a request on the wire: the framing is lost, nothing to salvage.
        assert transport.pool_stats() == (0, 0)
        assert transport.connections_abandoned == (0, 1)
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        await transport.aclose()

    run(main())


def test_a_response_closed_before_a_small_rest_keeps_its_connection(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        response = await transport.handle_async_request(make_request("GET", server.url("/trickle/100")))
        async for chunk in response.aiter_raw():  # the first half of the body
            assert chunk
            break
        await response.aclose()  # the app left before the rest came
        assert transport.pool_stats() == (1, 0)  # salvaging
        await wait_for(lambda: transport.pool_stats() == (0, 1), what="the connection to go idle")
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10) and response.extensions["egress.reused"] is True
        await transport.aclose()

    run(main())
    assert server.connections == 1


def test_a_request_cancelled_mid_body_is_salvaged(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        response = await transport.handle_async_request(make_request("GET", server.url("/trickle/100")))
        stream = response.aiter_raw()
        assert await stream.__anext__()  # the first half of the body
        conn = response.stream._conn  # type: ignore[attr-defined]
        reading = asyncio.create_task(stream.__anext__())
        await wait_for(lambda: conn.waiter is not None, what="the read to wait for the rest")
        reading.cancel()  # the forward path cancels its task when the app goes away
        with pytest.raises(asyncio.CancelledError):
            await reading
        await response.aclose()
        await wait_for(lambda: transport.pool_stats() == (0, 1), what="the connection to go idle")
        assert transport.connections_abandoned == (1, 0)
        await transport.aclose()

    run(main())
    assert server.connections == 1


@pytest.mark.parametrize("path", [f"/big/{4 << 20}", f"/bytes/{4 << 20}?chunked=1"])
def test_a_download_abandoned_mid_body_past_the_bound_is_closed(certs: Certs, server: Upstream, path: str) -> None:
    """Past 64 KiB left (by Content-Length at once; chunked once 64 KiB more were read)."""

    async def main() -> None:
        transport = transport_for(certs, max_connections=1)
        response = await transport.handle_async_request(make_request("GET", server.url(path)))
        async for chunk in response.aiter_raw():
            assert chunk
            break
        await response.aclose()
        await wait_for(lambda: transport.pool_stats() == (0, 0), what="the slot to be freed")
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        assert transport.connections_abandoned == (0, 1)
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10) and response.extensions["egress.reused"] is False
        await transport.aclose()

    run(main())


def test_a_salvage_past_its_deadline_closes_the_connection(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1, salvage_timeout=0.2)
        await _cancel_waiting_requests(transport, server, "/delay/1000", count=1, on_the_wire=1)
        assert transport.pool_stats() == (1, 0)
        await wait_for(lambda: transport.pool_stats() == (0, 0), timeout=0.9, what="the salvage deadline")
        await wait_for(lambda: not server.open, what="the upstream to see the close")
        assert transport.connections_abandoned == (0, 1)
        await transport.aclose()

    run(main())


def test_salvage_off_closes_at_once(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=1, salvage_timeout=0)
        await _cancel_waiting_requests(transport, server, "/delay/100", count=1, on_the_wire=1)
        assert transport.pool_stats() == (0, 0)
        await transport.aclose()

    run(main())


def test_closing_the_transport_ends_the_salvages(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, max_connections=2)
        await _cancel_waiting_requests(transport, server, "/stall", count=2, on_the_wire=2)
        assert transport.pool_stats() == (2, 0)
        await transport.aclose()  # cancels the salvages and waits for them
        assert transport.pool_stats() == (0, 0)
        assert not transport._salvage.tasks
        await wait_for(lambda: not server.open, what="the upstream to see the closes")
        assert transport.connections_abandoned == (0, 2)

    run(main())


def test_a_salvage_gives_its_slot_up_to_a_waiting_request(certs: Certs, server: Upstream) -> None:
    # A request queued for the slot would rather pay a new handshake than wait out a slow
    # rest (here 600 ms): the salvage gives up after SALVAGE_CONTENDED, not at its deadline.
    async def main() -> tuple[bool, int, tuple[int, int]]:
        transport = transport_for(certs, max_connections=1)
        await _cancel_waiting_requests(transport, server, "/delay/600", count=1, on_the_wire=1)
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10)
        await transport.aclose()
        return response.extensions["egress.reused"], transport.connections_opened, transport.connections_abandoned

    reused, opened, abandoned = run(main())
    assert (reused, opened, abandoned) == (False, 2, (0, 1))
