"""A FIFO gate in front of an HTTP/1.1 httpcore pool: requests wait here, not inside httpcore.

httpcore 1.0's pool costs O(waiting requests x connections) per request: every time a
connection frees, `_assign_requests_to_connections` hands that one idle connection to *every*
queued request (each sees it "available"), all of them wake, one wins and the rest go back to
waiting. Measured on this project's burst (256 concurrent requests, default pool of 100
connections, 2 cores): ~16 ms of sidecar CPU per request, a p99 latency of tens of seconds and
client read timeouts. With at most `max_connections` requests inside the pool, an HTTP/1.1
request always finds an idle connection or room for a new one, so nothing queues in httpcore.

The wait here is FIFO (asyncio.Semaphore) and bounded by the request's `pool` timeout, past
which it raises `httpx.PoolTimeout` (503 pool_timeout). A slot is held until the response
body is closed, which forward.py does on every path. HTTP/2 pools are not gated: there one
connection carries many requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx


class _ReleasingStream(httpx.AsyncByteStream):
    """The response body; closing it gives the request's slot back (once)."""

    __slots__ = ("_release", "_stream")

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # no extra generator layer per chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self._stream.aclose()
        finally:
            if release is not None:
                release()


class PoolGate(httpx.AsyncBaseTransport):
    """Admits at most `slots` requests at once into `inner`; see the module doc."""

    def __init__(self, inner: httpx.AsyncBaseTransport, slots: int) -> None:
        self.inner = inner
        self.slots = slots
        self._free = asyncio.Semaphore(slots)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot (for metrics and tests)."""
        waiters = self._free._waiters  # asyncio keeps no public count
        return len(waiters) if waiters else 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        free = self._free
        if free.locked():
            timeout = request.extensions.get("timeout", {}).get("pool")
            try:
                async with asyncio.timeout(timeout):
                    await free.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no upstream connection became free in time", request=request) from None
        else:
            await free.acquire()  # does not suspend: a slot is free
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            free.release()
            raise
        response.stream = _ReleasingStream(response.stream, free.release)  # type: ignore[arg-type]
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
