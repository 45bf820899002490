"""An HTTP/2 pool never has its exchange cancelled half-way (upstream._DeferredTransport).

httpcore and h2 each count a connection's open streams; a request cancelled while httpcore
waits for its write lock is released by the one and still counted by the other
(encode/httpcore#1022), and after enough of them every request on the connection failed
"Max outbound streams is 128, 128 open" (186 such 502s in one c256 `make bench` run of the
HTTP/2 route, 0 with this). The race needs a saturated CPU to show, so the end-to-end proof
is the benchmark; this checks the contract with a stand-in for httpx's transport.
"""

from __future__ import annotations

import asyncio

import httpx
import uvloop

from sidecar.upstream import _DeferredTransport


class Closing(httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield b"x"

    async def aclose(self) -> None:
        self.closed.set()


class SlowInner(httpx.AsyncBaseTransport):
    """Answers once `release` is set; records whether it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False
        self.stream = Closing()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return httpx.Response(200, stream=self.stream)


def test_a_cancelled_caller_leaves_the_exchange_to_finish_and_closes_its_response() -> None:
    async def main() -> tuple[bool, bool]:
        inner = SlowInner()
        transport = _DeferredTransport(lambda: inner)
        caller = asyncio.ensure_future(transport.handle_async_request(httpx.Request("GET", "https://a.test/")))
        await inner.started.wait()
        caller.cancel()  # the app went away
        try:
            await caller
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the caller's cancellation was swallowed")
        inner.release.set()  # the upstream answers after all
        await asyncio.wait_for(inner.stream.closed.wait(), 5)
        await transport.aclose()
        return inner.cancelled, inner.stream.closed.is_set()

    assert uvloop.run(main()) == (False, True)


def test_an_answer_goes_to_a_caller_that_stayed() -> None:
    async def main() -> int:
        inner = SlowInner()
        transport = _DeferredTransport(lambda: inner)
        caller = asyncio.ensure_future(transport.handle_async_request(httpx.Request("GET", "https://a.test/")))
        await inner.started.wait()
        inner.release.set()
        response = await caller
        return response.status_code

    assert uvloop.run(main()) == 200
