"""A request body that can be sent again: kept as it streams out, up to a limit.

Lives with the transports because both layers use it: the HTTP/2 transport replays streams a
GOAWAY or REFUSED_STREAM left unprocessed (RFC 9113 8.7), and the resilience layer's retries
(sidecar/resilience/retry.py) wrap bodies in it.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import httpx


class ReplayableBody(httpx.AsyncByteStream):
    """A streamed request body that can be sent again while everything sent so far was kept.

    The body still streams on the first try (nothing waits for the whole body): each chunk is
    kept as it goes out, up to `limit` bytes. A later try replays the kept chunks and then goes
    on reading the source. Once more than `limit` bytes went out the kept copy is dropped and
    `replayable` turns False for good: a large body is never buffered and never retried. A try
    that failed before pulling any chunk (a connect failure) leaves even a large body replayable.
    """

    __slots__ = ("_done", "_kept", "_kept_bytes", "_limit", "_source", "replayable")

    def __init__(self, source: AsyncIterable[bytes], limit: int) -> None:
        self._source: AsyncIterator[bytes] = aiter(source)
        self._limit = limit
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._done = False
        self.replayable = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if not self.replayable:
            raise RuntimeError("request body was already streamed and cannot be sent again")
        for chunk in tuple(self._kept):
            yield chunk
        while not self._done:
            # anext, not `async for`: the source must stay open between tries.
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                self._done = True
                return
            if self.replayable:
                self._kept_bytes += len(chunk)
                if self._kept_bytes > self._limit:
                    self.replayable = False
                    self._kept = []
                else:
                    self._kept.append(chunk)
            yield chunk
