"""Connection accounting: a global slot limit, a LIFO idle stack per origin, a FIFO wait queue.

A slot is the right to hold one connection (connecting, active or idle); there are
`max_connections` of them across all origins. Idle connections are kept per origin, newest on
top (LIFO: the warmest connection is reused, the coldest ones age out). When every slot is
taken, requests wait in one FIFO queue; a freed slot or a released connection goes to the
longest waiter. Each idle connection has at most one expiry timer, re-armed lazily.

The pool owns its bookkeeping, as aiohttp's connector does: which connections hold a slot,
which are idle and since when, their expiry timers, live in the pool's own records (`_Held`,
`OriginSlots`), not on the connections. It sees a connection only through `PooledConnection`,
so its unit tests (tests/transport/test_pool.py) drive it with a fake one. The choices
(`release_action`, `reserve_action`) are pure functions that return what to do; the methods
do it, as httpcore's `_assign_requests_to_connections` decides and then closes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from sidecar.upstream.transport.origin import Origin, OriginKey

_SLOT = None  # what a waiter receives when it is granted a slot rather than a connection
_TIMED_OUT = object()
_MAX_ORIGINS = 4096  # past this many remembered origins, forget those holding no connection


class PooledConnection(Protocol):
    """What the pool needs of a connection."""

    origin: Origin
    # Set by the pool while the connection is idle: called (with the connection) when the peer
    # closes it, so the pool forgets it at once rather than at the next request.
    on_lost: Callable[[Any], None] | None

    def usable(self) -> bool:
        """A request may be sent on it (open, and the peer has not closed it)."""

    def close(self) -> None:
        """Close gracefully (idle connections)."""

    def end_exchange(self) -> bool:
        """The response came off the wire whole: forget its unread bytes; True if it may be reused."""

    def fail(self) -> None:
        """The exchange did not end cleanly: abort the connection and let go of what it holds."""


Conn = TypeVar("Conn", bound=PooledConnection)


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class OriginSlots(Generic[Conn]):
    """The pool's record of one origin: its idle connections (oldest first) and slots held."""

    __slots__ = ("connections", "idle", "origin")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.idle: list[_Held[Conn]] = []
        self.connections = 0  # slots held for this origin


class _Held(Generic[Conn]):
    """The pool's record of one connection holding a slot."""

    __slots__ = ("conn", "expiry", "idle", "idle_since", "slots")

    def __init__(self, conn: Conn, slots: OriginSlots[Conn]) -> None:
        self.conn = conn
        self.slots = slots
        self.idle = False  # in its origin's idle stack
        self.idle_since = 0.0
        self.expiry: asyncio.TimerHandle | None = None


class Release:
    """What becomes of a connection whose exchange ended cleanly. (Plain constants, not an Enum:
    an Enum member lookup costs ~0.1 µs, and these are read on every request.)"""

    CLOSE = "close"  # unusable, the pool is closing, or enough are idle: close it, free its slot
    HAND_OVER = "hand_over"  # the longest waiter wants its origin: the waiter gets the connection
    MAKE_WAY = "make_way"  # the longest waiter wants another origin: close it, the slot passes on
    KEEP_IDLE = "keep_idle"  # nobody waits: on top of its origin's idle stack


def release_action(usable: bool, pool_closed: bool, waiter_same_origin: bool | None, idle_full: bool) -> str:
    """The release decision. `waiter_same_origin`: None when nobody waits, else whether the
    longest waiter wants this connection's origin. Waiters come before keeping it idle."""
    if not usable or pool_closed:
        return Release.CLOSE
    if waiter_same_origin is not None:
        return Release.HAND_OVER if waiter_same_origin else Release.MAKE_WAY
    return Release.CLOSE if idle_full else Release.KEEP_IDLE


class Reserve:
    """How a request that found no idle connection of its origin gets a slot."""

    FREE = "free"  # a slot is free
    EVICT = "evict"  # none is, but another origin's idle connection can make way
    WAIT = "wait"  # every slot is busy: queue


def reserve_action(total: int, max_connections: int, idle_count: int) -> str:
    if total < max_connections:
        return Reserve.FREE
    return Reserve.EVICT if idle_count else Reserve.WAIT


class Pool(Generic[Conn]):
    """The slots and idle stacks of one transport. All methods run on the event loop."""

    def __init__(self, max_connections: int, max_idle: int, keepalive_expiry: float | None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self.origins: dict[OriginKey, OriginSlots[Conn]] = {}
        self.total = 0  # slots held
        self.idle_count = 0
        self.opened = 0  # connections ever opened (a Prometheus counter reads it)
        self.closed = False
        self._held: dict[Conn, _Held[Conn]] = {}
        self._waiters: deque[tuple[asyncio.Future[object], OriginSlots[Conn]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- origins ----

    def origin(self, key: OriginKey) -> Origin | None:
        """The origin remembered under `key`, if any."""
        slots = self.origins.get(key)
        return slots.origin if slots is not None else None

    def remember(self, origin: Origin) -> None:
        """Keep `origin` for later requests; forgets connection-less ones past _MAX_ORIGINS."""
        if len(self.origins) >= _MAX_ORIGINS and not self._waiters:
            for key in [k for k, s in self.origins.items() if s.connections == 0]:
                del self.origins[key]
        self.origins[origin.key] = OriginSlots(origin)

    def _slots(self, origin: Origin) -> OriginSlots[Conn]:
        slots = self.origins.get(origin.key)
        if slots is None:  # forgotten (it held no connection) since the request looked it up
            slots = self.origins[origin.key] = OriginSlots(origin)
        return slots

    # ---- getting a connection ----

    def take_idle(self, origin: Origin, now: float) -> Conn | None:
        """The newest usable idle connection of `origin`, closing stale ones on the way."""
        slots = self.origins.get(origin.key)
        if slots is None:
            return None
        stack = slots.idle
        expiry = self.keepalive_expiry
        while stack:
            held = stack.pop()
            held.idle = False
            self.idle_count -= 1
            conn = held.conn
            conn.on_lost = None
            if conn.usable() and (expiry is None or now - held.idle_since < expiry):
                return conn
            conn.close()
            self.discard(conn)
        return None

    def try_reserve(self, origin: Origin) -> bool:
        """Take a free slot for a new connection to `origin`, evicting another origin's idle
        connection if that is the only way. False when every slot is busy."""
        action = reserve_action(self.total, self.max_connections, self.idle_count)
        if action is Reserve.FREE:
            self.total += 1
            self._slots(origin).connections += 1
            return True
        if action is Reserve.EVICT:
            victim = self._oldest_idle()
            if victim is not None:
                self._forget(victim)
                victim.conn.close()
                victim.slots.connections -= 1
                self._slots(origin).connections += 1  # the victim's slot passes to us
                return True
        return False

    def adopt(self, conn: Conn) -> None:
        """`conn`, new, holds the slot its request reserved (try_reserve, or granted by `wait`)."""
        self._held[conn] = _Held(conn, self._slots(conn.origin))

    def holds(self, conn: Conn) -> bool:
        """Whether `conn` holds one of the pool's slots (idle or in use)."""
        return conn in self._held

    async def wait(self, origin: Origin, timeout: float | None) -> Conn | None:
        """Queue for a slot. Returns a released connection of `origin`, or None for a slot to
        connect with; raises PoolWaitTimeout after `timeout` seconds."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        waiter: asyncio.Future[object] = loop.create_future()
        slots = self._slots(origin)
        self._waiters.append((waiter, slots))
        handle = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        try:
            result = await waiter
        except BaseException:
            # Cancelled: if we were granted something meanwhile, hand it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                granted = waiter.result()
                if granted is _SLOT:
                    slots.connections -= 1
                    self._free_slot()
                elif granted is not _TIMED_OUT:
                    self.release(granted)  # type: ignore[arg-type]
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

    def release(self, conn: Conn) -> None:
        """A finished exchange left `conn` reusable: give it to a waiter or keep it idle."""
        held = self._held.get(conn)
        if held is None:  # not (or no longer) ours: nothing to give back
            conn.close()
            return
        usable = conn.usable() and not self.closed
        waiter = self._first_waiter() if usable and self._waiters else None
        same = None if waiter is None else waiter[1] is held.slots
        action = release_action(usable, self.closed, same, self.idle_count >= self.max_idle)
        if action is Release.KEEP_IDLE:  # the common case first
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            now = loop.time()
            held.idle = True
            held.idle_since = now
            conn.on_lost = self._idle_lost
            held.slots.idle.append(held)
            self.idle_count += 1
            if held.expiry is None and self.keepalive_expiry is not None:
                held.expiry = loop.call_at(now + self.keepalive_expiry, self._check_expiry, held)
        elif action is Release.HAND_OVER:
            assert waiter is not None
            waiter[0].set_result(conn)
        elif action is Release.MAKE_WAY:
            assert waiter is not None
            self._forget(held)
            conn.close()
            held.slots.connections -= 1
            waiter[1].connections += 1
            waiter[0].set_result(_SLOT)
        else:
            conn.close()
            self.discard(conn)

    def _first_waiter(self) -> tuple[asyncio.Future[object], OriginSlots[Conn]] | None:
        """The longest waiter still waiting, taken off the queue (cancelled ones are dropped)."""
        waiters = self._waiters
        while waiters:
            entry = waiters.popleft()
            if not entry[0].done():
                return entry
        return None

    def finish(self, conn: Conn) -> None:
        """The whole response of `conn`'s exchange came off the wire: reuse it if it may."""
        if conn.end_exchange():
            self.release(conn)
        else:
            conn.close()
            self.discard(conn)

    def drop(self, conn: Conn) -> None:
        """`conn`'s exchange did not end cleanly: abort the connection and free its slot."""
        conn.fail()
        self.discard(conn)

    def discard(self, conn: Conn) -> None:
        """`conn` is gone (closed, failed, aborted): free its slot. Safe to call twice."""
        held = self._held.get(conn)
        if held is None:
            return
        self._forget(held)
        held.slots.connections -= 1
        self._free_slot()

    def reclaim(self, conn: Conn) -> None:
        """Close `conn` but keep its slot for the caller, who opens a new connection to the
        same origin with it (a waiter handed a connection that died meanwhile must not lose
        its place to the next waiter)."""
        held = self._held.get(conn)
        if held is not None:
            self._forget(held)  # the slot, and its count on the origin, pass to the new connection
        conn.close()

    def _forget(self, held: _Held[Conn]) -> None:
        """Drop the record of a connection leaving the pool (its slot is dealt with by the caller)."""
        del self._held[held.conn]
        if held.idle:
            self._unidle(held)
        held.conn.on_lost = None
        if held.expiry is not None:
            # The expiry timer holds the record, which holds the connection (with its socket
            # and TLS state): cancelled so a dead connection is not kept alive until it fires.
            held.expiry.cancel()
            held.expiry = None

    def _free_slot(self) -> None:
        waiter = self._first_waiter()
        if waiter is not None:
            waiter[1].connections += 1
            waiter[0].set_result(_SLOT)
            return
        self.total -= 1

    # ---- idle housekeeping ----

    def _unidle(self, held: _Held[Conn]) -> None:
        held.idle = False
        try:
            held.slots.idle.remove(held)
        except ValueError:  # pragma: no cover - idle flag and stack always agree
            return
        self.idle_count -= 1

    def _idle_lost(self, conn: Conn) -> None:
        """The server closed an idle connection: forget it now, not at the next request."""
        self.discard(conn)

    def _check_expiry(self, held: _Held[Conn]) -> None:
        held.expiry = None
        if not held.idle or self.keepalive_expiry is None:
            return  # in use or gone; the next release re-arms the timer
        assert self._loop is not None
        deadline = held.idle_since + self.keepalive_expiry
        if self._loop.time() >= deadline:
            held.conn.close()
            self.discard(held.conn)
        else:
            held.expiry = self._loop.call_at(deadline, self._check_expiry, held)

    def _oldest_idle(self) -> _Held[Conn] | None:
        oldest: _Held[Conn] | None = None
        for slots in self.origins.values():
            if slots.idle:
                candidate = slots.idle[0]
                if oldest is None or candidate.idle_since < oldest.idle_since:
                    oldest = candidate
        return oldest

    # ---- introspection and shutdown ----

    def stats(self) -> tuple[int, int]:
        """(active, idle) connections; connecting ones count as active."""
        return self.total - self.idle_count, self.idle_count

    def close_all(self) -> list[Conn]:
        """Stop handing out connections; close the idle ones, fail the waiters."""
        self.closed = True
        idle: list[Conn] = []
        for slots in self.origins.values():
            idle.extend(held.conn for held in slots.idle)
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
