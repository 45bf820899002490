"""httpcore internals behind httpx's stock transport (HTTP/2 routes).

Touches (httpcore 1.0, httpx 0.28; re-read `httpx/_transports/default.py` and
`httpcore/_async/connection_pool.py`):
- `httpx.AsyncHTTPTransport._pool`: the `httpcore.AsyncConnectionPool` it wraps;
- `AsyncConnectionPool._network_backend`: the backend each new connection dials through,
  replaced by the connect guard (httpx's transport takes no backend of its own);
- `AsyncConnectionPool.connections` with each connection's `is_idle()` / `is_closed()`:
  the pool's counts at scrape time;
- `AsyncHTTP11Connection._response_closed` (replaced, see `close_after_surplus`), `_h11_state`
  and `_state_lock` (httpcore/_async/http11.py), and h11's `Connection.trailing_data`.

httpcore (with h2, hpack, hyperframe, anyio: ~25 ms of imports) is loaded only when an
HTTP/2 pool takes its first request, so this module imports it only inside functions.
"""

from __future__ import annotations

from typing import Any

_original_response_closed: Any = None  # httpcore's own, kept by close_after_surplus


def set_network_backend(transport: Any, backend: Any) -> None:
    """Make every new connection of httpx's `AsyncHTTPTransport` dial through `backend`.

    Call before first use. Fails loudly (at start, or at a pool's first request) if the
    attribute ever moves.
    """
    import httpcore

    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpx transport layout changed: cannot install the egress connect guard")
    pool._network_backend = backend


def pool_counts(transport: Any) -> tuple[int, int]:
    """(active, idle) connections of httpx's `AsyncHTTPTransport`, read from its httpcore pool."""
    connections = transport._pool.connections
    idle = sum(1 for c in connections if c.is_idle())
    closed = sum(1 for c in connections if c.is_closed())
    return len(connections) - idle - closed, idle


async def _response_closed(self: Any) -> None:
    import h11  # loaded with httpcore already

    state = self._h11_state
    if state.their_state is h11.DONE and state.trailing_data[0]:
        async with self._state_lock:
            await self.aclose()
        return
    await _original_response_closed(self)


def close_after_surplus() -> None:
    """Close httpcore's HTTP/1.1 connections that have bytes left after a response (idempotent).

    An `http2: true` route goes through httpx's stock transport; when the upstream's ALPN picks
    HTTP/1.1, httpcore speaks it with h11. h11 keeps whatever bytes came after a complete
    response in its buffer, and httpcore, seeing both sides DONE, starts the next cycle on
    that connection: the next request, another app's perhaps, is answered with those bytes
    (a `304` followed by `200 ... POISONED` in one read gave the *next* request the 200).
    Our own transport refuses such bytes (transport/wire.py `is_surplus`); this gives httpcore's
    HTTP/1.1 connection the same rule: a connection with bytes left after the response is
    closed instead of going back to the pool. The app still gets exactly the first response.
    Installed when the first stock transport is built.
    """
    global _original_response_closed
    from httpcore._async.http11 import AsyncHTTP11Connection

    current = AsyncHTTP11Connection._response_closed
    if current is not _response_closed:
        _original_response_closed = current
        AsyncHTTP11Connection._response_closed = _response_closed  # type: ignore[method-assign]
