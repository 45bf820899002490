"""httpcore internals behind httpx's stock transport (HTTP/2 routes).

Touches (httpcore 1.0, httpx 0.28; re-read `httpx/_transports/default.py` and
`httpcore/_async/connection_pool.py`):
- `httpx.AsyncHTTPTransport._pool`: the `httpcore.AsyncConnectionPool` it wraps;
- `AsyncConnectionPool._network_backend`: the backend each new connection dials through,
  replaced by the connect guard (httpx's transport takes no backend of its own);
- `AsyncConnectionPool.connections` with each connection's `is_idle()` / `is_closed()`:
  the pool's counts at scrape time.

httpcore (with h2, hpack, hyperframe, anyio: ~25 ms of imports) is loaded only when an
HTTP/2 pool takes its first request, so this module imports it only inside functions.
"""

from __future__ import annotations

from typing import Any


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
