"""Connection accounting: a global slot limit, a LIFO idle stack per origin, a FIFO wait queue.

A slot is the right to hold one connection (connecting, active or idle); there are
`max_connections` of them across all origins. Idle connections are kept per origin, newest on
top (LIFO: the warmest connection is reused, the coldest ones age out). When every slot is
taken, requests wait in one FIFO queue; a freed slot or a released connection goes to the
longest waiter. Each idle connection has at most one expiry timer, re-armed lazily.
"""

from __future__ import annotations

import asyncio
from collections import deque

from sidecar.transport.connection import Connection

OriginKey = tuple[bytes, bytes, int | None]

_SLOT = None  # what a waiter receives when it is granted a slot rather than a connection
_TIMED_OUT = object()
_MAX_ORIGINS = 4096  # past this many remembered origins, forget those holding no connection


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Origin:
    """Where connections go (scheme, host, port) and its idle connections."""

    __slots__ = ("connections", "host", "idle", "key", "port", "server_hostname", "tls")

    def __init__(self, key: OriginKey, tls: bool, host: str, port: int, server_hostname: str) -> None:
        self.key = key
        self.tls = tls
        self.host = host
        self.port = port
        self.server_hostname = server_hostname
        self.idle: list[Connection] = []
        self.connections = 0  # slots held for this origin


class Pool:
    """The slots and idle stacks of one transport. All methods run on the event loop."""

    def __init__(self, max_connections: int, max_idle: int, keepalive_expiry: float | None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self.origins: dict[OriginKey, Origin] = {}
        self.total = 0  # slots held
        self.idle_count = 0
        self.opened = 0  # connections ever opened (a Prometheus counter reads it)
        self.closed = False
        self._waiters: deque[tuple[asyncio.Future[object], Origin]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- origins ----

    def remember(self, origin: Origin) -> None:
        """Keep `origin` for later requests; forgets connection-less ones past _MAX_ORIGINS."""
        if len(self.origins) >= _MAX_ORIGINS and not self._waiters:
            for key in [k for k, o in self.origins.items() if o.connections == 0]:
                del self.origins[key]
        self.origins[origin.key] = origin

    # ---- getting a connection ----

    def take_idle(self, origin: Origin, now: float) -> Connection | None:
        """The newest usable idle connection of `origin`, closing stale ones on the way."""
        stack = origin.idle
        expiry = self.keepalive_expiry
        while stack:
            conn = stack.pop()
            conn.idle = False
            self.idle_count -= 1
            if conn.usable() and (expiry is None or now - conn.idle_since < expiry):
                return conn
            conn.close()
            self.discard(conn)
        return None

    def try_reserve(self, origin: Origin) -> bool:
        """Take a free slot for a new connection to `origin`, evicting another origin's idle
        connection if that is the only way. False when every slot is busy."""
        if self.total < self.max_connections:
            self.total += 1
            origin.connections += 1
            return True
        if self.idle_count:
            victim = self._oldest_idle()
            if victim is not None:
                self._unidle(victim)
                victim.close()
                victim.pooled = False
                victim.origin.connections -= 1
                origin.connections += 1  # the victim's slot passes to us
                return True
        return False

    async def wait(self, origin: Origin, timeout: float | None) -> Connection | None:
        """Queue for a slot. Returns a released connection of `origin`, or None for a slot to
        connect with; raises PoolWaitTimeout after `timeout` seconds."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        waiter: asyncio.Future[object] = loop.create_future()
        self._waiters.append((waiter, origin))
        handle = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            result = await waiter
        except BaseException:
            # Cancelled: if we were granted something meanwhile, hand it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                granted = waiter.result()
                if isinstance(granted, Connection):
                    granted.active = False
                    self.release(granted)
                elif granted is _SLOT:
                    origin.connections -= 1
                    self._free_slot()
            raise
        finally:
            if handle is not None:
                handle.cancel()
        if result is _TIMED_OUT:
            raise PoolWaitTimeout()
        return result  # type: ignore[return-value]

    def has_waiters(self) -> bool:
        """Whether a request is queued for a slot (cancelled waiters left in the queue do not count)."""
        return any(not waiter.done() for waiter, _ in self._waiters)

    # ---- giving a connection back ----

    def release(self, conn: Connection) -> None:
        """A finished exchange left `conn` reusable: give it to a waiter or keep it idle."""
        origin = conn.origin
        if not conn.usable() or self.closed:
            conn.close()
            self.discard(conn)
            return
        waiters = self._waiters
        while waiters:
            waiter, wanted = waiters.popleft()
            if waiter.done():
                continue
            if wanted is origin:
                waiter.set_result(conn)
                return
            # The longest waiter wants another origin: this connection makes way for it.
            conn.close()
            conn.pooled = False
            origin.connections -= 1
            wanted.connections += 1
            waiter.set_result(_SLOT)
            return
        if self.idle_count >= self.max_idle:
            conn.close()
            self.discard(conn)
            return
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        now = loop.time()
        conn.idle = True
        conn.idle_since = now
        conn.on_idle_lost = self._idle_lost
        origin.idle.append(conn)
        self.idle_count += 1
        if conn.expiry_handle is None and self.keepalive_expiry is not None:
            conn.expiry_handle = loop.call_at(now + self.keepalive_expiry, self._check_expiry, conn)

    def finish(self, conn: Connection) -> None:
        """The whole response of `conn`'s exchange came off the wire: reuse it if it may."""
        conn.active = False
        conn.drop_body()  # bytes nobody will read; resumes reading if it was paused
        if conn.keep_alive and conn.request_sent:
            self.release(conn)
        else:
            conn.close()
            self.discard(conn)

    def drop(self, conn: Connection) -> None:
        """`conn`'s exchange did not end cleanly: abort the connection and free its slot."""
        conn.abort()
        conn.forget_error()  # see Connection.forget_error
        conn.chunks.clear()
        self.discard(conn)

    def discard(self, conn: Connection) -> None:
        """`conn` is gone (closed, failed, aborted): free its slot. Safe to call twice."""
        if conn.idle:
            self._unidle(conn)
        if conn.pooled:
            conn.pooled = False
            conn.origin.connections -= 1
            self._free_slot()

    def reclaim(self, conn: Connection) -> None:
        """Close `conn` but keep its slot for the caller, who opens a new connection to the
        same origin with it (a waiter handed a connection that died meanwhile must not lose
        its place to the next waiter)."""
        if conn.idle:
            self._unidle(conn)
        conn.close()
        conn.pooled = False  # the slot, and its count on the origin, pass to the new connection

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter, wanted = waiters.popleft()
            if not waiter.done():
                wanted.connections += 1
                waiter.set_result(_SLOT)
                return
        self.total -= 1

    # ---- idle housekeeping ----

    def _unidle(self, conn: Connection) -> None:
        conn.idle = False
        try:
            conn.origin.idle.remove(conn)
        except ValueError:  # pragma: no cover - idle flag and stack always agree
            return
        self.idle_count -= 1

    def _idle_lost(self, conn: Connection) -> None:
        """The server closed an idle connection: forget it now, not at the next request."""
        self.discard(conn)

    def _check_expiry(self, conn: Connection) -> None:
        conn.expiry_handle = None
        if not conn.idle or self.keepalive_expiry is None:
            return  # in use or gone; the next release re-arms the timer
        assert self._loop is not None
        deadline = conn.idle_since + self.keepalive_expiry
        if self._loop.time() >= deadline:
            conn.close()
            self.discard(conn)
        else:
            conn.expiry_handle = self._loop.call_at(deadline, self._check_expiry, conn)

    def _oldest_idle(self) -> Connection | None:
        oldest: Connection | None = None
        for origin in self.origins.values():
            if origin.idle:
                candidate = origin.idle[0]
                if oldest is None or candidate.idle_since < oldest.idle_since:
                    oldest = candidate
        return oldest

    # ---- introspection and shutdown ----

    def stats(self) -> tuple[int, int]:
        """(active, idle) connections; connecting ones count as active."""
        return self.total - self.idle_count, self.idle_count

    def close_all(self) -> list[Connection]:
        """Stop handing out connections; close the idle ones, fail the waiters."""
        self.closed = True
        idle: list[Connection] = []
        for origin in self.origins.values():
            idle.extend(origin.idle)
        for conn in idle:
            conn.close()
            self.discard(conn)
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed())
        return idle


class PoolWaitTimeout(Exception):
    """No slot came free within the pool timeout (the transport raises httpx.PoolTimeout)."""


class PoolClosed(Exception):
    """The transport was closed while a request waited for a slot."""
