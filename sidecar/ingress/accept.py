"""Accepting a burst of new connections at once, not one per event-loop turn.

libuv (under uvloop) accepts exactly one connection each time the listening socket polls
readable (`uv__server_io`), that is once per loop iteration. Under load one iteration serves
hundreds of requests and takes milliseconds, so when an app opens many connections at once
(a client pool warming up, a restart, a load test) the later ones wait in the kernel's
backlog for seconds: with 256 new connections at full load the last waited ~1.5 s here,
while every accepted request was answered in under 60 ms.

`BurstAcceptor` watches a duplicate of each listening descriptor and, when it polls
readable, accepts everything waiting (up to `_BATCH` per wake, so a flood cannot starve the
requests already in), handing each socket to the server's own protocol factory: the
connection is then exactly what uvicorn would have made. libuv keeps accepting on the
original descriptor too; whichever gets to a connection first takes it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

# Connections taken per wake-up: enough to empty a burst in a few loop turns.
_BATCH = 256
# Out of descriptors or memory: stop accepting for this long (asyncio's own choice, 1 s).
_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class BurstAcceptor:
    """Drains the accept queue of some listening sockets into `protocol_factory` connections."""

    def __init__(self, protocol_factory: Callable[[], asyncio.Protocol], retry_delay: float = _RETRY_DELAY) -> None:
        self._factory = protocol_factory
        self._retry_delay = retry_delay
        self._loop = asyncio.get_running_loop()
        self._listeners: list[socket.socket] = []
        self._opening: set[asyncio.Task[None]] = set()

    def watch(self, listener: socket.socket) -> None:
        """Accept for `listener` (its descriptor is duplicated; the original stays the server's)."""
        dup = socket.socket(fileno=os.dup(listener.fileno()))
        dup.setblocking(False)
        self._listeners.append(dup)
        self._loop.add_reader(dup.fileno(), self._accept_all, dup)

    def _accept_all(self, listener: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # the backlog is empty (or libuv took the last one)
            except ConnectionAbortedError:
                continue  # reset by the client while it was queued
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # The listener stays readable, so retrying at once would spin the loop.
                    # Step back for a while; libuv's own watcher still sheds load meanwhile.
                    self._pause(listener)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _pause(self, listener: socket.socket) -> None:
        self._loop.remove_reader(listener.fileno())
        self._loop.call_later(self._retry_delay, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        if listener in self._listeners:  # not closed meanwhile
            self._loop.add_reader(listener.fileno(), self._accept_all, listener)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()  # the client left before the transport was made

    def close(self) -> None:
        """Stop accepting (the server's own listener closes with the server)."""
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()
