"""BurstAcceptor on uvloop with real sockets: a queued burst is taken in one wake-up.

Counted in loop turns, not seconds: libuv accepts one connection per turn, so under load
(where a turn takes milliseconds) a burst of new connections waits in the backlog.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import uvloop

from sidecar.ingress.accept import BurstAcceptor

BURST = 64
TURNS = 8


class Made(asyncio.Protocol):
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Made.count += 1
        transport.close()


@pytest.fixture
def backlog() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket with BURST connections completed by the kernel, not yet accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(BURST * 2)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(BURST)]
    Made.count = 0
    yield listener, clients
    for client in clients:
        client.close()
    listener.close()


async def made_after_turns(turns: int) -> int:
    for _ in range(turns):
        await asyncio.sleep(0)
    return Made.count


def test_uvloop_alone_accepts_one_connection_per_loop_turn(backlog: tuple[socket.socket, list[socket.socket]]) -> None:
    # Why BurstAcceptor exists. Should a uvloop release accept whole bursts, this fails:
    # then the acceptor can go.
    listener, _ = backlog

    async def main() -> int:
        server = await asyncio.get_running_loop().create_server(Made, sock=listener)
        try:
            return await made_after_turns(TURNS)
        finally:
            server.close()

    assert uvloop.run(main()) <= TURNS


def test_the_acceptor_takes_a_whole_burst_at_once(backlog: tuple[socket.socket, list[socket.socket]]) -> None:
    listener, _ = backlog

    async def main() -> int:
        acceptor = BurstAcceptor(Made)
        acceptor.watch(listener)
        try:
            return await made_after_turns(TURNS)
        finally:
            acceptor.close()

    assert uvloop.run(main()) == BURST


def test_a_closed_acceptor_takes_nothing_more_and_leaves_the_listener_open(
        backlog: tuple[socket.socket, list[socket.socket]]) -> None:
    listener, _ = backlog

    async def main() -> int:
        acceptor = BurstAcceptor(Made)
        acceptor.watch(listener)
        acceptor.close()
        return await made_after_turns(TURNS)

    assert uvloop.run(main()) == 0
    listener.setblocking(False)
    conn, _ = listener.accept()  # the server's own descriptor still works
    conn.close()


_OUT_OF_DESCRIPTORS = """
import asyncio, os, resource, socket, sys
import uvloop
from sidecar.ingress.accept import BurstAcceptor

class Made(asyncio.Protocol):
    count = 0
    def connection_made(self, transport):
        Made.count += 1
        transport.close()

async def main():
    listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(64)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(8)]
    acceptor = BurstAcceptor(Made, retry_delay=0.3)
    wakes = 0
    accept_all = acceptor._accept_all
    def counted(sock):
        nonlocal wakes
        wakes += 1
        accept_all(sock)
    acceptor._accept_all = counted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    acceptor.watch(listener)  # its descriptor duplicated before the limit is lowered
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
    for _ in range(300):  # loop turns while every accept fails with EMFILE
        await asyncio.sleep(0)
    wakes_while_out = wakes
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    loop = asyncio.get_running_loop(); deadline = loop.time() + 5
    while Made.count < 8 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    acceptor.close()
    print(wakes_while_out, Made.count)

uvloop.run(main())
"""


def test_out_of_descriptors_pauses_accepting_instead_of_spinning() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _OUT_OF_DESCRIPTORS], capture_output=True, text=True,
                          timeout=30, check=True)
    wakes_while_out, made = map(int, done.stdout.split())
    assert wakes_while_out <= 2  # one failed wake, then a pause (not one wake per loop turn)
    assert made == 8  # and every connection is accepted once descriptors are back
