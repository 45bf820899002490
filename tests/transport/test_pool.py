"""The transport's pool on its own, driven with fake connections (no sockets): its decisions.

The pool sees a connection only through `PooledConnection`; `FakeConnection` is that interface
and a record of what the pool did to it. Timers run on a real event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar.upstream.transport.origin import Origin
from sidecar.upstream.transport.pool import (
    Pool,
    PoolClosed,
    PoolWaitTimeout,
    Release,
    Reserve,
    release_action,
    reserve_action,
)

A = Origin((b"https", b"a.test", None), True, "a.test", 443, "a.test")
B = Origin((b"https", b"b.test", None), True, "b.test", 443, "b.test")


class FakeConnection:
    """PooledConnection, recording how the pool ended it."""

    def __init__(self, origin: Origin, name: str = "") -> None:
        self.origin = origin
        self.name = name
        self.on_lost: Callable[[Any], None] | None = None
        self.open = True
        self.reusable = True  # what end_exchange answers
        self.ended: str | None = None  # "close" or "abort"
        self.closed = asyncio.Event()

    def usable(self) -> bool:
        return self.open

    def close(self) -> None:
        self._end("close")

    def end_exchange(self) -> bool:
        return self.reusable

    def fail(self) -> None:
        self._end("abort")

    def peer_closes(self) -> None:
        self.open = False
        if self.on_lost is not None:
            self.on_lost(self)

    def _end(self, how: str) -> None:
        self.open = False
        self.ended = self.ended or how
        self.closed.set()

    def __repr__(self) -> str:
        return f"FakeConnection({self.name})"


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(5):
            await test()

    asyncio.run(bounded())


def new(pool: Pool[FakeConnection], origin: Origin, name: str = "") -> FakeConnection:
    """A new connection on a free slot, as the transport opens one."""
    assert pool.try_reserve(origin)
    conn = FakeConnection(origin, name)
    pool.adopt(conn)
    return conn


def invariant(pool: Pool[FakeConnection]) -> None:
    """Slots, idle counts and per-origin counts agree."""
    assert pool.idle_count == sum(len(slots.idle) for slots in pool.origins.values())
    assert sum(slots.connections for slots in pool.origins.values()) == pool.total
    assert 0 <= pool.total <= pool.max_connections


# ---- the pure decisions ---------------------------------------------------------------------

@pytest.mark.parametrize(("usable", "closed", "waiter", "idle_full", "action"), [
    (False, False, None, False, Release.CLOSE),
    (False, False, True, False, Release.CLOSE),  # a dead connection is never handed over
    (True, True, True, False, Release.CLOSE),  # the pool is closing
    (True, False, True, True, Release.HAND_OVER),  # a waiter comes before the idle limit
    (True, False, False, False, Release.MAKE_WAY),
    (True, False, None, True, Release.CLOSE),
    (True, False, None, False, Release.KEEP_IDLE),
])
def test_release_action(usable: bool, closed: bool, waiter: bool | None, idle_full: bool, action: Release) -> None:
    assert release_action(usable, closed, waiter, idle_full) is action


@pytest.mark.parametrize(("total", "idle", "action"), [
    (0, 0, Reserve.FREE), (2, 2, Reserve.FREE), (3, 1, Reserve.EVICT), (3, 0, Reserve.WAIT)])
def test_reserve_action(total: int, idle: int, action: Reserve) -> None:
    assert reserve_action(total, 3, idle) is action


def test_a_pool_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pool(0, 0, None)


# ---- reuse ----------------------------------------------------------------------------------

def test_idle_connections_are_reused_newest_first() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(4, 4, 60.0)
        first, second = new(pool, A, "first"), new(pool, A, "second")
        pool.finish(first)
        pool.finish(second)
        assert pool.stats() == (0, 2)
        now = asyncio.get_running_loop().time()
        assert pool.take_idle(A, now) is second
        assert pool.take_idle(A, now) is first
        assert pool.take_idle(A, now) is None and pool.take_idle(B, now) is None
        assert pool.stats() == (2, 0)
        invariant(pool)

    run(test)


def test_a_stale_or_dead_idle_connection_is_closed_on_the_way() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(4, 4, 10.0)
        old, dead, fresh = new(pool, A, "old"), new(pool, A, "dead"), new(pool, A, "fresh")
        for conn in (old, dead, fresh):
            pool.finish(conn)
        dead.open = False  # closed, the pool not told yet
        now = asyncio.get_running_loop().time()
        assert pool.take_idle(A, now) is fresh
        assert pool.take_idle(A, now + 11.0) is None  # `old` has been idle too long
        assert (old.ended, dead.ended, fresh.ended) == ("close", "close", None)
        assert pool.stats() == (1, 0)
        invariant(pool)

    run(test)


def test_an_exchange_that_may_not_be_reused_closes_its_connection() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(2, 2, None)
        conn = new(pool, A)
        conn.reusable = False
        pool.finish(conn)
        assert conn.ended == "close" and pool.stats() == (0, 0) and not pool.holds(conn)

    run(test)


def test_past_max_idle_a_released_connection_is_closed() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(3, 1, None)
        kept, extra = new(pool, A), new(pool, A)
        pool.finish(kept)
        pool.finish(extra)
        assert (kept.ended, extra.ended) == (None, "close")
        assert pool.stats() == (0, 1)
        invariant(pool)

    run(test)


def test_a_dropped_exchange_aborts_and_frees_the_slot_once() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        pool.drop(conn)
        pool.discard(conn)  # safe twice
        assert conn.ended == "abort" and pool.total == 0
        assert pool.try_reserve(B)
        invariant(pool)

    run(test)


# ---- a full pool ----------------------------------------------------------------------------

def test_a_full_pool_evicts_another_origins_oldest_idle_connection() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(2, 2, None)
        older, newer = new(pool, A, "older"), new(pool, B, "newer")
        pool.finish(older)
        pool.finish(newer)
        assert pool.try_reserve(A) is True  # full, but an idle connection can make way
        assert (older.ended, newer.ended) == ("close", None)
        assert pool.origins[A.key].connections == 1 and pool.origins[B.key].connections == 1
        assert pool.total == 2 and pool.stats() == (1, 1)
        assert pool.try_reserve(B) is True  # evicts `newer`, B's own: its slot is B's again
        assert newer.ended == "close" and pool.try_reserve(A) is False
        invariant(pool)

    run(test)


def test_waiters_are_served_first_in_first_out() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        assert not pool.try_reserve(A)
        order: list[str] = []

        async def waiter(name: str) -> FakeConnection | None:
            granted = await pool.wait(A, None)
            order.append(name)
            return granted

        first = asyncio.create_task(waiter("first"))
        second = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)  # both queue
        assert pool.has_waiters()
        pool.finish(conn)
        assert await first is conn
        assert not second.done()
        pool.finish(conn)
        assert await second is conn
        assert order == ["first", "second"] and not pool.has_waiters()
        assert conn.ended is None and pool.stats() == (1, 0)
        invariant(pool)

    run(test)


def test_a_connection_makes_way_for_a_waiter_of_another_origin() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        waiting = asyncio.create_task(pool.wait(B, None))
        await asyncio.sleep(0)
        pool.finish(conn)
        assert await waiting is None  # a slot, to connect to B with
        assert conn.ended == "close"
        assert pool.origins[A.key].connections == 0 and pool.origins[B.key].connections == 1
        invariant(pool)

    run(test)


def test_a_freed_slot_goes_to_the_longest_waiter() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        waiting = asyncio.create_task(pool.wait(B, None))
        await asyncio.sleep(0)
        pool.drop(conn)
        assert await waiting is None and pool.total == 1
        invariant(pool)

    run(test)


def test_a_waiter_times_out() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        new(pool, A)
        with pytest.raises(PoolWaitTimeout):
            await pool.wait(A, 0.01)
        assert not pool.has_waiters()

    run(test)


def test_a_waiter_given_a_dead_connection_reclaims_its_slot() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        first = asyncio.create_task(pool.wait(A, None))
        second = asyncio.create_task(pool.wait(A, None))
        await asyncio.sleep(0)
        pool.finish(conn)
        granted = await first
        assert granted is conn
        conn.open = False  # died before the waiter could use it
        pool.reclaim(conn)  # closed, but its slot stays with the first waiter
        replacement = FakeConnection(A, "replacement")
        pool.adopt(replacement)
        assert conn.ended == "close" and not second.done() and pool.total == 1
        assert pool.origins[A.key].connections == 1
        pool.finish(replacement)
        assert await second is replacement
        invariant(pool)

    run(test)


def test_a_waiter_cancelled_after_it_was_handed_a_connection_passes_it_on() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        leaving = asyncio.create_task(pool.wait(A, None))
        staying = asyncio.create_task(pool.wait(A, None))
        await asyncio.sleep(0)
        pool.finish(conn)  # handed to `leaving`, which has not run yet
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await staying is conn
        assert conn.ended is None
        invariant(pool)

    run(test)


def test_a_waiter_cancelled_after_it_was_granted_a_slot_frees_it() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        leaving = asyncio.create_task(pool.wait(B, None))
        await asyncio.sleep(0)
        pool.drop(conn)  # the slot goes to `leaving`
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert pool.total == 0 and pool.origins[B.key].connections == 0
        invariant(pool)

    run(test)


# ---- idle housekeeping ----------------------------------------------------------------------

def test_an_idle_connection_expires() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(2, 2, 0.05)
        conn = new(pool, A)
        pool.finish(conn)
        assert conn.on_lost is not None
        await conn.closed.wait()  # the expiry timer closed it (run() bounds the wait)
        assert conn.ended == "close" and pool.stats() == (0, 0) and not pool.holds(conn)
        invariant(pool)

    run(test)


def test_a_connection_reused_before_its_expiry_is_not_closed_by_the_old_timer() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(2, 2, 0.05)
        conn = new(pool, A)
        pool.finish(conn)
        assert pool.take_idle(A, asyncio.get_running_loop().time()) is conn
        assert conn.on_lost is None
        other = new(pool, A)
        pool.finish(other)
        await other.closed.wait()  # other's timer fired, so conn's (armed earlier) did too
        assert conn.ended is None and pool.holds(conn)

    run(test)


def test_an_idle_connection_the_peer_closes_is_forgotten_at_once() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(1, 1, None)
        conn = new(pool, A)
        pool.finish(conn)
        conn.peer_closes()
        assert pool.stats() == (0, 0) and not pool.holds(conn) and conn.on_lost is None
        assert pool.try_reserve(B)
        invariant(pool)

    run(test)


def test_close_all_closes_the_idle_and_fails_the_waiters() -> None:
    async def test() -> None:
        pool: Pool[FakeConnection] = Pool(3, 3, None)
        idle = new(pool, A)
        pool.finish(idle)
        assert pool.close_all() == [idle] and idle.ended == "close"
        busy, other = new(pool, A), new(pool, B)
        new(pool, B)  # every slot taken: the next request waits
        waiting = asyncio.create_task(pool.wait(B, None))
        await asyncio.sleep(0)
        pool.close_all()
        with pytest.raises(PoolClosed):
            await waiting
        pool.finish(busy)  # an exchange ending after the close: closed, not kept
        assert busy.ended == "close" and other.ended is None and pool.stats() == (2, 0)
        invariant(pool)

    run(test)


def test_origins_without_connections_are_forgotten_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.upstream.transport import pool as pool_module

    monkeypatch.setattr(pool_module, "_MAX_ORIGINS", 3)
    pool: Pool[FakeConnection] = Pool(4, 4, None)
    held = Origin((b"https", b"held.test", None), True, "held.test", 443, "held.test")
    pool.remember(held)
    assert pool.try_reserve(held)
    for index in range(5):
        name = f"o{index}.test"
        pool.remember(Origin((b"https", name.encode(), None), True, name, 443, name))
    assert len(pool.origins) <= 3 and pool.origin(held.key) is held
