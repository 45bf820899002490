"""A scripted HTTP/1.1 upstream for the transport tests: real sockets, real TLS (trustme).

It runs on its own uvloop event loop in a background thread, so the transport under test
shares nothing with it but the loopback network. The path picks the behaviour:

  /bytes/N[?chunked=1]  N seeded random bytes (Content-Length, or chunked in 16 KiB chunks)
  /big/N                N bytes repeating a 1 MiB random block, written with flow control
  /gzip                 a gzip body with Content-Encoding: gzip
  /head                 the raw request head, as received, as the body
  /upload               reads the body; answers its length, sha256 and framing
  /cookies              three Set-Cookie headers in order
  /status/C             status C (204/304 without body)
  /delay/MS             answers after MS milliseconds
  /trickle/MS           a 2000-byte body: the head and 1000 bytes, the rest after MS milliseconds
  /close                answers with Connection: close and closes
  /http10               an HTTP/1.0 answer delimited by connection close
  /until-close          an HTTP/1.1 answer with no length, delimited by close
  /close-after          answers keep-alive, then closes the idle connection at once
  /drop-next            answers keep-alive; the next request on that connection is dropped
  /reset-next           answers keep-alive; the next request on that connection gets a reset
  /disconnect /reset    closes (FIN) / resets (RST) without answering
  /reset-mid-body       sends a head for 1 MiB, 64 KiB of it, then a reset
  /stall                never answers
  /no-read              stops reading the request body (a stuck server)
  /malformed            answers garbage
  /early-413            answers 413 + Connection: close right after the head, stops reading
  /huge-head            answers with a 200 KiB header
  /early-hints          sends 103 Early Hints, then the answer
  /huge-trailer         a chunked answer whose trailer section is 200 KiB
  /endless-header       a head whose one header line grows past 200 KiB and never ends
  /two-responses        a 304 and a second response (`200 ... POISONED`) in one write
  /extra-after-body     Content-Length 5 and more bytes after those 5, in one write
  /extra-after-chunked  a chunked body, then a second response, in one write
  /body-then-response   Content-Length 5, its body, then a second response, in one write
  /switching            101 Switching Protocols followed by raw bytes
  /extra-after-head     a response whose head is followed by bytes (to a HEAD request)
  /length-and-chunked   Content-Length and Transfer-Encoding: chunked together
  /two-lengths          two Content-Length fields that differ
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import random
import socket
import ssl
import struct
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httptools
import trustme
import uvloop

T = TypeVar("T")

BLOCK = random.Random(1).randbytes(1 << 20)
GZIP_BODY = gzip.compress(b"hello gzip " * 1000)


# Hostile answers, each written in one go: a response plus bytes that must never reach the app.
POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED"
HOSTILE = {
    "two-responses": b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n" + POISON,
    "extra-after-body": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHELLO-POISONED",
    "body-then-response": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHELLO" + POISON,
    "extra-after-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nHELLO\r\n0\r\n\r\n" + POISON,
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\nPOISONED",
    "extra-after-head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHELLO" + POISON,
    "length-and-chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"8\r\nPOISONED\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 8\r\n\r\nPOISONED",
}


def seeded_bytes(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def big_body_sha256(n: int) -> str:
    digest = hashlib.sha256()
    left = n
    while left:
        piece = BLOCK[: min(left, len(BLOCK))]
        digest.update(piece)
        left -= len(piece)
    return digest.hexdigest()


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test coroutine on a fresh uvloop loop, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


async def wait_for(condition: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `condition()` until true; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.raw = bytearray()
        self.head = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = True
        self.drop_next = False
        self.reset_next = False
        self.body_hash = hashlib.sha256()
        self.body_len = 0
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.server.open.add(self)
        self.server.max_open = max(self.server.max_open, len(self.server.open))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.open.discard(self)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    # httptools
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_hash = hashlib.sha256()
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        end = self.raw.find(b"\r\n\r\n")
        self.head = bytes(self.raw[: end + 4])
        self.raw = bytearray()
        self.in_head = False
        self.server.requests += 1
        self.server.heads.append(self.head)
        if self.drop_next:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.reset_next:
            self.drop_next = True  # answer nothing more on this connection
            self.reset()
            return
        path = self.url.split(b"?")[0]
        if path == b"/no-read":
            self.transport.pause_reading()  # type: ignore[union-attr]
        elif path == b"/early-413":
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.send(413, [(b"Content-Length", b"9"), (b"Connection", b"close")], b"too large")
        elif path in (b"/stall", b"/disconnect", b"/reset"):
            self.respond_early(path)

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        self.body_hash.update(body)

    def on_message_complete(self) -> None:
        self.in_head = True  # the next bytes start a new request head
        if self.drop_next or self.closed:
            return
        asyncio.get_running_loop().create_task(self.respond())

    # responses
    def respond_early(self, path: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if path == b"/disconnect":
            transport.close()
        elif path == b"/reset":
            self.reset()

    def reset(self) -> None:
        transport = self.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def write_head(self, status: int, headers: list[tuple[bytes, bytes]], version: bytes = b"HTTP/1.1") -> bytes:
        lines = [b"%s %d %s" % (version, status, b"OK" if status == 200 else b"X")]
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def send(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        if self.parser.get_method() == b"HEAD":
            body = b""
        self.transport.write(self.write_head(status, headers) + body)  # type: ignore[union-attr]

    async def respond(self) -> None:
        transport = self.transport
        assert transport is not None
        target = self.url.decode()
        path, _, query = target.partition("?")
        parts = path.strip("/").split("/")
        name = parts[0]
        if name in ("stall", "disconnect", "reset"):
            return
        if name == "bytes":
            n = int(parts[1])
            body = seeded_bytes(n)
            if "chunked=1" in query:
                pieces = [body[i : i + 16384] for i in range(0, n, 16384)]
                data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
                if self.parser.get_method() == b"HEAD":
                    data = b""
                transport.write(self.write_head(200, [(b"Transfer-Encoding", b"chunked")]) + data)
            else:
                self.send(200, [(b"Content-Length", str(n).encode())], body)
        elif name == "big":
            await self.send_big(int(parts[1]))
        elif name == "gzip":
            self.send(200, [(b"Content-Length", str(len(GZIP_BODY)).encode()),
                            (b"Content-Encoding", b"gzip")], GZIP_BODY)
        elif name == "head":
            self.send(200, [(b"Content-Length", str(len(self.head)).encode())], self.head)
        elif name == "upload":
            framing = "chunked" if any(k.lower() == b"transfer-encoding" for k, _ in self.headers) else "length"
            body = json.dumps({"length": self.body_len, "sha256": self.body_hash.hexdigest(),
                               "framing": framing}).encode()
            self.send(200, [(b"Content-Length", str(len(body)).encode())], body)
        elif name == "cookies":
            self.send(200, [(b"Set-Cookie", b"a=1"), (b"X-Mid", b"m"), (b"Set-Cookie", b"b=2"),
                            (b"Set-Cookie", b"c=3"), (b"Content-Length", b"2")], b"ok")
        elif name == "status":
            code = int(parts[1])
            if code in (204, 304):
                self.send(code, [(b"ETag", b'"x"')] if code == 304 else [])
            else:
                self.send(code, [(b"Content-Length", b"2")], b"ok")
        elif name == "delay":
            await asyncio.sleep(int(parts[1]) / 1000)
            self.send(200, [(b"Content-Length", b"2")], b"ok")
        elif name == "trickle":
            body = seeded_bytes(2000)
            transport.write(self.write_head(200, [(b"Content-Length", b"2000")]) + body[:1000])
            await asyncio.sleep(int(parts[1]) / 1000)
            if not self.closed:
                transport.write(body[1000:])
        elif name == "close":
            self.send(200, [(b"Content-Length", b"2"), (b"Connection", b"close")], b"ok")
            transport.close()
        elif name == "http10":
            transport.write(self.write_head(200, [(b"X-Version", b"1.0")], b"HTTP/1.0") + b"old server body")
            transport.close()
        elif name == "until-close":
            transport.write(self.write_head(200, []) + b"body until close")
            transport.close()
        elif name == "close-after":
            self.send(200, [(b"Content-Length", b"2")], b"ok")
            transport.close()
        elif name == "reset-next":
            self.send(200, [(b"Content-Length", b"2")], b"ok")
            self.reset_next = True
        elif name == "drop-next":
            self.send(200, [(b"Content-Length", b"2")], b"ok")
            self.drop_next = True
        elif name == "reset-mid-body":
            transport.write(self.write_head(200, [(b"Content-Length", str(1 << 20).encode())]) + BLOCK[:65536])
            await self.drain()
            self.reset()
        elif name == "no-read":
            return
        elif name == "early-hints":
            transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            self.send(200, [(b"Content-Length", b"2")], b"ok")
        elif name == "huge-trailer":
            trailer = b"X-Trailer: " + b"t" * (200 << 10) + b"\r\n\r\n"
            transport.write(self.write_head(200, [(b"Transfer-Encoding", b"chunked")]) + b"2\r\nok\r\n0\r\n")
            for offset in range(0, len(trailer), 16384):  # in pieces, as a slow trickle would come
                transport.write(trailer[offset : offset + 16384])
                await self.drain()
        elif name == "endless-header":
            transport.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            for _ in range(200 << 10 >> 14):  # 200 KiB in pieces, never terminated
                transport.write(b"e" * 16384)
                await self.drain()
        elif name == "huge-head":
            self.send(200, [(b"X-Huge", b"h" * (200 << 10)), (b"Content-Length", b"2")], b"ok")
        elif name in HOSTILE:
            transport.write(HOSTILE[name])
        elif name == "malformed":
            transport.write(b"HTTP/1.1 abc nonsense\r\n\x00\x01\r\n\r\n")
        else:
            self.send(200, [(b"Content-Length", b"2")], b"ok")

    async def drain(self) -> None:
        await self.writable.wait()

    async def send_big(self, n: int) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(self.write_head(200, [(b"Content-Length", str(n).encode())]))
        view = memoryview(BLOCK)
        left = n
        while left and not self.closed:
            piece = view[: min(left, 65536 * 4)] if left < len(BLOCK) else view
            for offset in range(0, len(piece), 65536):
                transport.write(piece[offset : offset + 65536])
                await self.drain()
                if self.closed:
                    return
            left -= len(piece)


class Upstream:
    """The server: start() in a thread, stop() at teardown. Counters are read by tests."""

    def __init__(self, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1") -> None:
        self.ssl_context = ssl_context
        self.host = host
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.max_open = 0
        self.open: set[_ServerConnection] = set()
        self.sni_names: list[str | None] = []
        self.heads: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        if ssl_context is not None:
            ssl_context.sni_callback = self._record_sni

    def _record_sni(self, ssl_object: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.sni_names.append(name)

    def start(self) -> Upstream:
        ready = threading.Event()

        def main() -> None:
            loop = uvloop.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            server = loop.run_until_complete(
                loop.create_server(lambda: _ServerConnection(self), self.host, 0, ssl=self.ssl_context)
            )
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            for conn in list(self.open):
                if conn.transport is not None:
                    conn.transport.abort()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=main, name="transport-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def url(self, path: str, host: str | None = None) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"


class Certs:
    """A trustme CA with a leaf for 127.0.0.1, localhost and upstream.test."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("127.0.0.1", "localhost", "upstream.test")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.leaf.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.set_alpn_protocols(["http/1.1"])
        return context


@contextlib.contextmanager
def upstream(certs: Certs | None, context: ssl.SSLContext | None = None) -> Iterator[Upstream]:
    """A running upstream: TLS with `certs` (or the given server `context`), else plain TCP."""
    if context is None and certs is not None:
        context = certs.server_context()
    server = Upstream(context).start()
    try:
        yield server
    finally:
        server.stop()
