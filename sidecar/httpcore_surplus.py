"""Surplus bytes on httpcore's HTTP/1.1 connections: close the connection, never reuse it.

An `http2: true` route goes through httpx's stock transport; when the upstream's ALPN picks
HTTP/1.1, httpcore speaks it with h11. h11 keeps whatever bytes came after a complete
response in its buffer, and httpcore, seeing both sides DONE, starts the next cycle on
that connection: the next request, another app's perhaps, is answered with those bytes
(a `304` followed by `200 ... POISONED` in one read gave the *next* request the 200).
Our own transport refuses such bytes (transport/wire.py `is_surplus`); this gives httpcore's
HTTP/1.1 connection the same rule: a connection with bytes left after the response is
closed instead of going back to the pool. The app still gets exactly the first response.

The one use of httpcore internals for this (STYLE: one seam per library), installed once
when the first stock transport is built: `AsyncHTTP11Connection._response_closed`,
`_h11_state`, `_state_lock` (httpcore 1.0.x, src/httpcore/_async/http11.py).
tests/unit/test_httpcore_surplus.py fails if they move.
"""

from __future__ import annotations

from typing import Any

import h11
from httpcore._async.http11 import AsyncHTTP11Connection

_ORIGINAL = AsyncHTTP11Connection._response_closed


async def _response_closed(self: Any) -> None:
    state: h11.Connection = self._h11_state
    if state.their_state is h11.DONE and state.trailing_data[0]:
        async with self._state_lock:
            await self.aclose()
        return
    await _ORIGINAL(self)


def install() -> None:
    """Patch httpcore's HTTP/1.1 connection (idempotent)."""
    AsyncHTTP11Connection._response_closed = _response_closed  # type: ignore[method-assign]
