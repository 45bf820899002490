"""HTTP/2 connection accounting: streams per connection, connections per origin, FIFO waiters.

One connection per origin carries as many streams as the server's SETTINGS_MAX_CONCURRENT_STREAMS
allows; a second is opened only when every connection of the origin is full (or closing after a
GOAWAY) and requests are waiting. Waiters queue per origin in FIFO order; a freed stream is
handed to the longest waiter (reserved on the connection, so nobody arriving later takes it).
`max_connections` bounds connections (connecting, busy or idle) across all origins.

Idle connections are watched by one timer each: PING every `ping_interval` while idle, closed
if the previous PING went unanswered (dead peer, black-holed path) or after `keepalive_expiry`.

The pool takes decisions and hands out connections; it opens none itself (the transport does,
when a waiter is told `CONNECT`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.upstream.transport.h2_connection import H2Connection

OriginKey = tuple[bytes, bytes, int | None]

CONNECT = object()  # what a waiter is handed when it should open a new connection itself
RETRY = object()  # what a waiter is handed when it should look again (a connection went away)
_TIMED_OUT = object()


class H2Origin:
    """Where connections go (scheme, host, port), its connections and its waiters."""

    __slots__ = ("connecting", "connections", "host", "http1", "key", "port", "server_hostname", "tls",
                 "waiters", "width")

    def __init__(self, key: OriginKey, tls: bool, host: str, port: int, server_hostname: str) -> None:
        self.key = key
        self.tls = tls
        self.host = host
        self.port = port
        self.server_hostname = server_hostname
        self.connections: list[H2Connection] = []
        self.connecting = 0
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.width = 0  # streams per connection the server allowed last (0: not known yet)
        self.http1 = False  # ALPN chose http/1.1: requests go to the HTTP/1.1 transport


class PoolWaitTimeout(Exception):
    """No stream came free within the pool timeout."""


class PoolClosed(Exception):
    """The transport was closed while a request waited."""


class H2Pool:
    """Connections and waiters of one HTTP/2 transport. All methods run on the event loop."""

    def __init__(self, max_connections: int, keepalive_expiry: float | None, ping_interval: float) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.ping_interval = ping_interval
        self.origins: dict[OriginKey, H2Origin] = {}
        self.total = 0  # connections held, connecting ones included
        self.opened = 0
        self.closed = False

    # ---- getting a stream ----

    def pick(self, origin: H2Origin) -> H2Connection | None:
        """The first connection of `origin` with a free stream, when nobody queues before us."""
        if origin.waiters:
            return None
        for conn in origin.connections:
            if conn.free_streams() > 0:
                return conn
        return None

    def reserve_connect(self, origin: H2Origin) -> bool:
        """Take the right to open a new connection to `origin` now, if that is what is needed."""
        if self.total >= self.max_connections:
            return False
        if origin.connecting and (not origin.width or len(origin.waiters) < origin.connecting * origin.width):
            # The connections on their way will serve everyone waiting (or, before the first
            # one told us its stream limit, one connection at a time).
            return False
        self.total += 1
        origin.connecting += 1
        return True

    async def wait(self, origin: H2Origin, loop: asyncio.AbstractEventLoop, deadline: float | None) -> Any:
        """Queue until a connection with a reserved stream (or CONNECT, or RETRY) is handed to us."""
        if self.closed:
            raise PoolClosed()
        waiter: asyncio.Future[Any] = loop.create_future()
        origin.waiters.append(waiter)
        handle = None if deadline is None else loop.call_at(deadline, _time_out, waiter)
        try:
            result = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(origin, waiter.result())
            else:
                _forget(origin.waiters, waiter)
            raise
        finally:
            if handle is not None:
                handle.cancel()
        if result is _TIMED_OUT:
            _forget(origin.waiters, waiter)
            raise PoolWaitTimeout()
        return result

    def _give_back(self, origin: H2Origin, granted: Any) -> None:
        """A waiter that was handed something left (cancelled): pass it on."""
        if granted is CONNECT:
            origin.connecting -= 1
            self.total -= 1
        elif granted is not RETRY and granted is not _TIMED_OUT:
            granted.reserved -= 1
        self.dispatch(origin)

    # ---- connections coming and going ----

    def connected(self, origin: H2Origin, conn: H2Connection) -> None:
        """A connection reserved with `reserve_connect` is up (its capacity known)."""
        origin.connecting -= 1
        origin.connections.append(conn)
        origin.width = max(conn.capacity, 1)
        self.opened += 1
        conn.idle_since = conn.loop.time()

    def connect_failed(self, origin: H2Origin) -> None:
        origin.connecting -= 1
        self.total -= 1
        self.dispatch(origin)

    def changed(self, conn: H2Connection) -> None:
        """The connection's hook: streams freed, capacity changed, GOAWAY, or it ended."""
        origin = conn.origin
        if conn.closed:
            if conn in origin.connections:
                origin.connections.remove(conn)
                self.total -= 1
            _cancel_timer(conn)
            for other in self.origins.values():  # its slot may be what another origin waits for
                if other is not origin and other.waiters:
                    self.dispatch(other)
        elif conn.closing and not conn.streams:
            conn.close()  # drained after GOAWAY: calls back here with `closed`
            return
        elif not conn.streams and conn in origin.connections:
            self._watch_idle(conn)
        self.dispatch(origin)

    def dispatch(self, origin: H2Origin) -> None:
        """Hand free streams to waiters, oldest first; let one connect if more are needed."""
        waiters = origin.waiters
        if not waiters:
            return
        for conn in origin.connections:
            while waiters and conn.free_streams() > 0:
                waiter = waiters.popleft()
                if not waiter.done():
                    conn.reserved += 1
                    waiter.set_result(conn)
        while waiters and waiters[0].done():
            waiters.popleft()
        if waiters and self.reserve_connect(origin):
            waiters.popleft().set_result(CONNECT)

    def take_reserved(self, conn: H2Connection) -> None:
        conn.reserved -= 1

    # ---- idle connections ----

    def _watch_idle(self, conn: H2Connection) -> None:
        if conn.ping_handle is None:
            conn.ping_handle = conn.loop.call_later(self.ping_interval, self._check_idle, conn)

    def _check_idle(self, conn: H2Connection) -> None:
        conn.ping_handle = None
        if conn.closed or conn.streams:
            return
        if conn.ping_pending:
            conn.abort()  # the last PING went unanswered for a whole interval: the peer is gone
            return
        expiry = self.keepalive_expiry
        if expiry is not None and conn.loop.time() - conn.idle_since >= expiry:
            conn.close()
            return
        conn.ping()
        conn.ping_handle = conn.loop.call_later(self.ping_interval, self._check_idle, conn)

    # ---- introspection and shutdown ----

    def stats(self) -> tuple[int, int]:
        """(active, idle) connections; connecting ones count as active."""
        idle = sum(1 for origin in self.origins.values() for conn in origin.connections if not conn.streams)
        return self.total - idle, idle

    def close_all(self) -> None:
        """Stop handing out streams; close idle connections (busy ones close when drained)."""
        self.closed = True
        for origin in self.origins.values():
            for conn in list(origin.connections):
                conn.closing = True
                if not conn.streams:
                    conn.close()
            while origin.waiters:
                waiter = origin.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(PoolClosed())


def _time_out(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


def _forget(waiters: deque[asyncio.Future[Any]], waiter: asyncio.Future[Any]) -> None:
    try:
        waiters.remove(waiter)
    except ValueError:
        pass


def _cancel_timer(conn: H2Connection) -> None:
    if conn.ping_handle is not None:
        conn.ping_handle.cancel()
        conn.ping_handle = None
