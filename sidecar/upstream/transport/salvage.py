"""Salvage: keep a connection whose caller went away, by reading the rest of its response.

When the app disconnects, the forward path cancels its request (while it waits for the
response head) or closes the response stream (mid-body). Aborting the upstream connection
then is safe but costs a new TCP and TLS handshake for a later request; under load that stops
with requests in flight (wrk at c256 closing its connections at the end of a run, a client
with a short timeout), up to one connection per abandoned request is thrown away, and the
pool pays as many handshakes again. So once the whole request has gone out, the connection
is handed to a background task that reads the rest of the response and, if it ends cleanly,
gives the connection back to the pool (to the longest waiter at once, else idle).

Bounds, so salvage never costs more than the handshake it saves:
- `SALVAGE_BYTES` (64 KiB) of body left to read: by Content-Length, or read from a chunked
  body before giving up. A TLS handshake costs a round trip and ~1-3 ms of CPU here; reading
  and decrypting 64 KiB on loopback or a LAN costs less, while reading a download the app
  abandoned (megabytes) would cost far more, and would keep the slot busy meanwhile. The
  resilience layer's discard of retried responses uses the same 64 KiB.
- `SALVAGE_TIMEOUT` (1 s), or the route's read timeout if shorter, for the head and the body
  together, while no request is waiting for a slot of the pool: an upstream slower than that
  (a long poll, a stalled server) is not worth a slot; the typical response that was in
  flight when its app left comes back in milliseconds.
- `SALVAGE_CONTENDED` (20 ms) once requests are queued for a slot: the connection keeps its
  slot while it is salvaged, and a waiter would rather pay a new handshake (a few ms) than
  wait out a slow rest. Without this, a 5-minute soak where 1 request in 10 abandons a
  50 KiB body trickling over a second ran at 157 req/s (p50 142 ms) instead of ~720: every
  abandoned download held one of the 16 slots for up to the full second.

A request cut short (cancelled mid-upload, or a body the server refused) leaves the framing
unknown: such connections are aborted as before, as are responses that close the connection
or whose body ends at the close, and any salvage that meets an error or a bound. The caller
never waits on a salvage: its cancellation propagates at once. Failures are not the app's
error (the app is gone): logged at debug level only.
"""

from __future__ import annotations

import asyncio

import structlog

from sidecar.upstream.transport.connection import Connection
from sidecar.upstream.transport.pool import Pool
from sidecar.upstream.transport.wire import may_salvage

log = structlog.get_logger("egress.transport")

SALVAGE_BYTES = 64 * 1024
SALVAGE_TIMEOUT = 1.0
SALVAGE_CONTENDED = 0.02


def salvageable(conn: Connection, salvage_read: int, limit: int) -> bool:
    """`wire.may_salvage` for the exchange in flight on `conn`."""
    return may_salvage(
        conn.request_sent,
        conn.head_request,
        conn.status if conn.head_done else None,
        conn.http_version,
        conn.headers,
        conn.body_bytes,
        salvage_read,
        limit,
    )


class Salvage:
    """The salvage tasks of one transport (a strong reference to each) and their counts."""

    __slots__ = ("closed", "contended", "kept", "limit", "pool", "tasks", "timeout")

    def __init__(self, pool: Pool[Connection], limit: int = SALVAGE_BYTES, timeout: float = SALVAGE_TIMEOUT,
                 contended: float = SALVAGE_CONTENDED) -> None:
        self.pool = pool
        self.limit = limit
        self.timeout = timeout  # 0 turns salvage off
        self.contended = contended
        self.tasks: set[asyncio.Task[None]] = set()
        # Connections whose caller went away: read to the end of the response and kept, or closed.
        self.kept = 0
        self.closed = 0

    def take(self, conn: Connection, read_timeout: float | None) -> bool:
        """Take over `conn`, whose caller went away; False if it cannot be salvaged (the
        caller then aborts it). The caller has stopped using `conn` either way."""
        timeout = self.timeout if read_timeout is None else min(self.timeout, read_timeout)
        if (
            timeout <= 0
            or self.pool.closed
            or conn.closed
            or conn.error is not None
            or not conn.active
            or not salvageable(conn, 0, self.limit)
        ):
            self.closed += 1
            return False
        conn.drop_body()  # what the caller left unread
        task = conn.loop.create_task(self._run(conn, timeout))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _run(self, conn: Connection, timeout: float) -> None:
        loop = conn.loop
        began = loop.time()
        deadline = began + timeout
        slice_ = self.contended
        contended = began + min(timeout, slice_)
        start = conn.body_bytes if conn.head_done else 0
        finished = False
        try:
            while True:
                conn.drop_body()
                if conn.body_done and conn.error is None:
                    finished = True
                    self.pool.finish(conn)  # released if keep-alive, closed otherwise
                    if self.pool.holds(conn):
                        self.kept += 1
                    else:
                        self.closed += 1
                    return
                if conn.error is not None or conn.closed:
                    return
                if not salvageable(conn, conn.body_bytes - start, self.limit):
                    return
                now = loop.time()
                if now >= contended and self.pool.has_waiters():
                    return  # requests are queued for a slot: theirs is the better use of it
                left = deadline - now
                if left <= 0:
                    return
                # Wake at least every `contended` seconds to look at the queue again.
                if not await conn.wait(min(left, max(contended - now, slice_))) and loop.time() >= deadline:
                    return
        except Exception as exc:  # noqa: BLE001 - nobody waits on a salvage: never the app's error
            log.debug("salvage_failed", error=repr(exc))
        finally:
            if not finished:
                # Over a bound, failed, or cancelled (the transport is closing): close it as an
                # abort would have at once.
                self.closed += 1
                self.pool.drop(conn)

    async def cancel_all(self) -> None:
        """The transport is closing: abort the connections being salvaged (and wait for it)."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
