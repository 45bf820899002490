"""H2Pool's decisions, driven with stand-in connections: who gets a stream, when to connect."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.upstream.transport.h2_pool import CONNECT, H2Origin, H2Pool, PoolWaitTimeout


class Conn:
    """The part of H2Connection the pool reads."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: H2Origin, capacity: int) -> None:
        self.loop = loop
        self.origin = origin
        self.capacity = capacity
        self.streams: dict[int, Any] = {}
        self.reserved = 0
        self.closing = self.closed = self.ping_pending = False
        self.ping_handle: Any = None
        self.idle_since = 0.0

    def free_streams(self) -> int:
        return 0 if self.closing or self.closed else self.capacity - len(self.streams) - self.reserved

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def origin() -> H2Origin:
    return H2Origin((b"https", b"a.test", 443), True, "a.test", 443, "a.test")


def connected(pool: H2Pool, where: H2Origin, loop: asyncio.AbstractEventLoop, capacity: int) -> Conn:
    assert pool.reserve_connect(where)
    conn = Conn(loop, where, capacity)
    pool.connected(where, conn)  # type: ignore[arg-type]
    return conn


def test_streams_go_to_the_first_connection_until_it_is_full(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(10, 60.0, 15.0), origin()
    first = connected(pool, where, loop, 2)
    second = connected(pool, where, loop, 2)
    assert pool.pick(where) is first
    first.streams = {1: None, 3: None}
    assert pool.pick(where) is second
    second.closing = True  # GOAWAY: no new stream there
    assert pool.pick(where) is None


def test_one_connection_at_a_time_until_the_servers_limit_is_known(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(10, 60.0, 15.0), origin()
    assert pool.reserve_connect(where)
    where.waiters.extend(loop.create_future() for _ in range(50))
    assert not pool.reserve_connect(where)  # its limit unknown: the first may serve them all
    where.width = 4  # learnt from an earlier connection: 50 waiters need more than one
    assert pool.reserve_connect(where)
    assert where.connecting == 2 and pool.total == 2


def test_no_connection_past_max_connections(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(1, 60.0, 15.0), origin()
    connected(pool, where, loop, 1)
    assert not pool.reserve_connect(where)


def test_a_freed_stream_goes_to_the_longest_waiter_and_is_reserved_for_it(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(1, 60.0, 15.0), origin()
    conn = connected(pool, where, loop, 1)
    conn.streams = {1: None}
    first, second = loop.create_future(), loop.create_future()
    where.waiters.extend([first, second])
    conn.streams = {}
    pool.changed(conn)  # type: ignore[arg-type]
    assert first.result() is conn and not second.done()
    assert conn.reserved == 1 and pool.pick(where) is None  # nobody arriving later takes it


def test_waiters_the_connections_cannot_serve_get_one_of_them_to_connect(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(10, 60.0, 15.0), origin()
    conn = connected(pool, where, loop, 2)
    waiters = [loop.create_future() for _ in range(3)]
    where.waiters.extend(waiters)
    pool.dispatch(where)
    assert [w.result() for w in waiters[:2]] == [conn, conn]
    assert waiters[2].result() is CONNECT and where.connecting == 1


def test_waiting_past_the_pool_timeout_fails(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(1, 60.0, 15.0), origin()
    connected(pool, where, loop, 0)
    with pytest.raises(PoolWaitTimeout):
        loop.run_until_complete(pool.wait(where, loop, loop.time() + 0.01))
    assert not where.waiters


class Pinged(Conn):
    def __init__(self, loop: asyncio.AbstractEventLoop, where: H2Origin) -> None:
        super().__init__(loop, where, 4)
        self.pings = 0
        self.aborted = False

    def ping(self) -> None:
        self.pings += 1
        self.ping_pending = True

    def abort(self) -> None:
        self.aborted = self.closed = True


def test_an_idle_connection_is_pinged_and_dropped_when_the_ping_goes_unanswered(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool, where = H2Pool(10, None, 15.0), origin()
    assert pool.reserve_connect(where)
    conn = Pinged(loop, where)
    pool.connected(where, conn)  # type: ignore[arg-type]
    pool.changed(conn)  # type: ignore[arg-type]  # idle: the timer is armed
    assert conn.ping_handle is not None
    pool._check_idle(conn)  # type: ignore[arg-type]  # one interval later
    assert conn.pings == 1 and not conn.aborted
    conn.ping_pending = False  # answered
    pool._check_idle(conn)  # type: ignore[arg-type]
    assert conn.pings == 2 and not conn.aborted
    pool._check_idle(conn)  # type: ignore[arg-type]  # this one was not answered
    assert conn.aborted and conn.ping_handle is None


def test_an_idle_connection_closes_after_keepalive_expiry(loop: asyncio.AbstractEventLoop) -> None:
    pool, where = H2Pool(10, 5.0, 15.0), origin()
    assert pool.reserve_connect(where)
    conn = Pinged(loop, where)
    pool.connected(where, conn)  # type: ignore[arg-type]
    conn.idle_since = loop.time() - 6.0
    pool._check_idle(conn)  # type: ignore[arg-type]
    assert conn.closed and conn.pings == 0
