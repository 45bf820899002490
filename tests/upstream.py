"""A real TLS (or plain) HTTP/1.1 upstream for the tests, on 127.0.0.1, run in a thread.

It speaks HTTP with h11 over real asyncio sockets and behaves by path, so one server covers
the transparency and failure cases: echo, exact bytes, chunked, gzip, cookies, redirects,
HEAD/204/304, slow streams, stalls, resets and garbage. It records what it saw (connections,
requests with their headers in order) so tests can assert both sides.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import random
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body_size: int = 0  # body bytes received so far (updated as they arrive)
    body_complete: bool = False  # the request body ended properly
    peer_closed: bool = False  # the client (the sidecar) closed the connection while this request was open
    connection: int = 0  # the connection's number (1-based, in order of acceptance)


@dataclass
class Upstream:
    host: str
    port: int
    scheme: str
    connections: int = 0
    handshakes: int = 0
    requests: list[Seen] = field(default_factory=list)
    open_connections: int = 0
    counters: dict[str, int] = field(default_factory=dict)  # /flaky: tries seen per key
    peers: list[str] = field(default_factory=list)  # the client address of each connection, in order

    @property
    def base(self) -> str:
        return f"{self.scheme}://localhost:{self.port}"


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


GZIP_PAYLOAD = gzip.compress(b"hello gzip " * 500, mtime=0)


class _Handler:
    def __init__(self, state: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.state = state
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER)
        self.number = 0
        self.drop_next = False  # /drop-next: the next request on this connection gets no answer

    async def send(self, *events: Any) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                self.conn.receive_data(data)
                continue
            return event

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: close sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def wait_for_close(self, seen: Seen) -> None:
        """Read and discard until the peer closes, then record it (stall cases)."""
        try:
            while await self.reader.read(65536):
                pass
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        seen.peer_closed = True

    async def run(self) -> None:
        self.state.connections += 1
        self.number = self.state.connections
        self.state.open_connections += 1
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, (h11.ConnectionClosed, h11.EndOfMessage)) or event is None:
                    return
                if not isinstance(event, h11.Request):
                    return
                keep_going = await self.handle(event)
                if not keep_going or self.conn.our_state is not h11.DONE:
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, h11.RemoteProtocolError, ssl.SSLError, OSError):
            return
        finally:
            self.state.open_connections -= 1
            if not self.writer.transport.is_closing():
                self.writer.close()

    async def read_body(self, seen: Seen) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        while True:
            try:
                event = await self.next_event()
            except (ConnectionError, ssl.SSLError, OSError, h11.RemoteProtocolError):
                seen.peer_closed = True
                raise ConnectionError("client went away mid-body") from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                seen.body_size = size
                digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                seen.body_complete = True
                return size, digest.hexdigest()
            else:
                seen.peer_closed = True
                raise ConnectionError("client went away mid-body")

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        await self.send(h11.Response(status_code=status, headers=headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def handle(self, request: h11.Request) -> bool:
        target = request.target.decode()
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        headers = [(k.decode(), v.decode()) for k, v in request.headers.raw_items()]
        seen = Seen(request.method.decode(), target, headers, connection=self.number)
        self.state.requests.append(seen)
        path = parts.path
        if self.drop_next:
            # The keep-alive race: the server gave up on this idle connection just as the
            # client reused it. It reads the request, then closes without an answer.
            self.writer.close()
            return False
        if path == "/reset":
            self.reset()
            return False
        if path == "/stall":
            await self.wait_for_close(seen)
            return False
        if path == "/garbage":
            self.writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await self.writer.drain()
            self.writer.close()
            return False
        size, sha = await self.read_body(seen)
        if path == "/echo" or path.startswith("/echo/"):
            body = json.dumps(
                {"method": seen.method, "target": target, "headers": headers, "body_size": size, "body_sha256": sha}
            ).encode()
            await self.respond(200, [("content-type", "application/json"), ("content-length", str(len(body)))], body)
        elif path == "/bytes":
            n, seed = int(query.get("n", "1024")), int(query.get("seed", "1"))
            await self.respond(200, [("content-length", str(n))], random_bytes(n, seed))
        elif path == "/chunked":
            n, seed = int(query.get("n", "1024")), int(query.get("seed", "1"))
            data = random_bytes(n, seed)
            await self.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
            for offset in range(0, n, 16384):
                await self.send(h11.Data(data=data[offset : offset + 16384]))
            await self.send(h11.EndOfMessage())
        elif path == "/gzip":
            await self.respond(
                200,
                [("content-encoding", "gzip"), ("content-type", "text/plain"), ("content-length", str(len(GZIP_PAYLOAD)))],
                GZIP_PAYLOAD if seen.method != "HEAD" else b"",
            )
        elif path == "/cookies":
            await self.respond(
                200,
                [("set-cookie", "a=1; Path=/"), ("x-multi", "one"), ("set-cookie", "b=2; Path=/"),
                 ("x-multi", "two"), ("set-cookie", "c=3; Path=/"), ("content-length", "2")],
                b"ok",
            )
        elif path == "/redirect":
            await self.respond(302, [("location", "https://elsewhere.example/"), ("content-length", "0")])
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            await self.respond(code, [("etag", '"v1"')] if code == 304 else [])
        elif path == "/head":
            await self.respond(200, [("content-length", "12345")])
        elif path == "/slow":
            # n chunks of 1 KiB every `interval` seconds, content-length framed (chunked=1: chunked).
            n, interval = int(query.get("n", "10")), float(query.get("interval", "0.1"))
            framing = ("transfer-encoding", "chunked") if query.get("chunked") else ("content-length", str(n * 1024))
            await self.send(h11.Response(status_code=200, headers=[framing]))
            for index in range(n):
                await self.send(h11.Data(data=random_bytes(1024, index)))
                await asyncio.sleep(interval)
            await self.send(h11.EndOfMessage())
        elif path == "/reset-mid":
            await self.send(h11.Response(status_code=200, headers=[("content-length", "100000")]))
            await self.send(h11.Data(data=b"x" * 1000))
            await asyncio.sleep(0.05)
            self.reset()
            return False
        elif path == "/head-then-stall":
            # The response head alone, then nothing until the peer closes (an SSE stream or a
            # long poll between events): the head must reach the app without waiting for a body.
            await self.send(h11.Response(status_code=200, headers=[("content-length", "100")]))
            await self.wait_for_close(seen)
            return False
        elif path == "/stall-mid":
            # Headers and the first KiB of 100,000 bytes, then nothing until the peer closes.
            await self.send(h11.Response(status_code=200, headers=[("content-length", "100000")]))
            await self.send(h11.Data(data=b"x" * 1024))
            await self.wait_for_close(seen)
            return False
        elif path == "/close-after":
            # A complete keep-alive response (no `Connection: close`), then the server closes
            # the connection anyway, as a server whose keep-alive timeout fired would: like
            # nginx, close_notify then the socket at once (asyncio alone would wait up to 30 s
            # for the peer's close_notify before sending FIN).
            await self.respond(200, [("content-length", "2")], b"ok")
            self.writer.close()
            self.writer.transport.abort()
            return False
        elif path == "/drop-next":
            await self.respond(200, [("content-length", "2")], b"ok")
            self.drop_next = True
        elif path == "/close":
            # HTTP/1.0 style: the body ends when the connection closes.
            self.writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + random_bytes(5000, 7))
            await self.writer.drain()
            self.writer.close()
            return False
        elif path == "/flaky":
            # Fails the first `fail` tries of each `key` (after reading the body), then echoes:
            # mode=reset sends RST before any response byte, mode=stall never answers,
            # mode=<status> answers that status.
            key, fail, mode = query.get("key", ""), int(query.get("fail", "1")), query.get("mode", "reset")
            tries = self.state.counters[key] = self.state.counters.get(key, 0) + 1
            if tries <= fail:
                if mode == "reset":
                    self.reset()
                    return False
                if mode == "stall":  # never answers (until the client gives up)
                    await asyncio.sleep(3600)
                    return False
                await self.respond(int(mode), [("content-length", "6"), ("x-try", str(tries))], b"failed")
            else:
                body = json.dumps({"tries": tries, "body_size": size, "body_sha256": sha}).encode()
                await self.respond(200, [("content-length", str(len(body)))], body)
        elif path == "/delay":
            # The response head comes after `s` seconds (a slow upstream, before headers).
            await asyncio.sleep(float(query.get("s", "0.5")))
            await self.respond(200, [("content-length", "7")], b"delayed")
        else:
            await self.respond(404, [("content-length", "9")], b"not found")
        return True


class UpstreamServer:
    """Starts the upstream on an ephemeral port in a background thread; `stop()` ends it."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1", port: int = 0,
        before: Any = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.host, self.port = host, port
        self.before = before  # called first in the server's thread (tests/sealed/pod.py: enter a netns)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.state: Upstream | None = None
        self.server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        if self.before is not None:
            self.before()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        state = Upstream(self.host, 0, "https" if self.ssl_context else "http")

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.peers.append(writer.get_extra_info("peername")[0])
            await _Handler(state, reader, writer).run()

        self.server = await asyncio.start_server(on_connect, self.host, self.port, ssl=self.ssl_context, backlog=512)
        state.port = self.server.sockets[0].getsockname()[1]
        self.state = state

    def start(self) -> Upstream:
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("upstream did not start")
        assert self.state is not None
        return self.state

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _AcceptingServer:
    """A bare TCP listener on 127.0.0.1 whose thread hands each accepted socket to `accepted_one`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def accepted_one(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted_one(conn)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


class SilentTLSServer(_AcceptingServer):
    """Accepts TCP connections and never answers (a TLS handshake that stalls)."""

    def __init__(self) -> None:
        self.accepted: list[socket.socket] = []
        super().__init__()

    def accepted_one(self, conn: socket.socket) -> None:
        self.accepted.append(conn)

    def stop(self) -> None:
        super().stop()
        for conn in self.accepted:
            conn.close()


class ResettingServer(_AcceptingServer):
    """Accepts TCP connections and resets each at once, before any TLS byte: a connect failure
    that, unlike a refused port, can be counted (`accepted`)."""

    def __init__(self) -> None:
        self.accepted = 0
        super().__init__()

    def accepted_one(self, conn: socket.socket) -> None:
        self.accepted += 1
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, message: str = "") -> Any:
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {message or predicate}")
        time.sleep(interval)
