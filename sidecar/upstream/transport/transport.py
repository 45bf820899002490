"""`HTTP11Transport`: an httpx transport for HTTP/1.1 (TLS or plain TCP) on asyncio protocols.

Why our own: through httpcore a request costs this proxy milliseconds of CPU (pool rescans,
anyio, per-request imports). A Protocol per connection, httptools' parser and a LIFO pool do
the same job in ~60-75 us per request at concurrency 32 including httpx's Request/Response
objects, against ~3,000 us for httpx's AsyncHTTPTransport in the same run; a bare TLS
protocol without HTTP is the floor at ~15-25 us (bench/micro/transport_micro.py; shared machine).
The API stays httpx's: the caller hands an `httpx.Request` to `handle_async_request` and
gets an `httpx.Response` whose stream yields the raw (de-chunked, never decompressed) body.

Retry rule, for the keep-alive race only: when the server closes a *reused* connection
cleanly (FIN / close_notify, not a reset) before any response byte (it timed the idle
connection out as we sent on it), the request is sent once more on a *new* connection if its
method is idempotent and its body is replayable (none, empty, or in memory; never a stream we
have started to consume). Resets, timeouts and fresh connections are never retried here: that
is the resilience layer's job, with its own budget and counts. See `wire.may_retry_on_fresh`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import httpx

from sidecar._compat.httpx import build_response, in_memory_body
from sidecar.upstream.transport import wire
from sidecar.upstream.transport.connect import ConnectTrace, Resolve, open_connection
from sidecar.upstream.transport.connection import DISCONNECTED, Connection, ServerDisconnected
from sidecar.upstream.transport.origin import Origin, origin_of
from sidecar.upstream.transport.pool import Pool, PoolClosed, PoolWaitTimeout
from sidecar.upstream.transport.salvage import SALVAGE_BYTES, SALVAGE_CONTENDED, SALVAGE_TIMEOUT, Salvage

_NO_TIMEOUTS: dict[str, float | None] = {}
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}


class _Stale(Exception):
    """A reused connection died before any response byte; carries the error to raise."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class HTTP11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over TLS or TCP with a pool of keep-alive connections.

    `ssl_context` is used for every https origin (the caller builds it: trust, client
    certificate, ALPN http/1.1). `resolve`, when given, returns the addresses a host may be
    dialled at (already checked by the egress policy); SNI and certificate checks still use
    the host name. `max_idle` defaults to `max_connections`. `retry_stale=False` turns off
    the one silent retry of the keep-alive race (see the module docstring).
    `salvage_bytes`, `salvage_timeout` and `salvage_contended` bound the reading of a response
    whose caller went away, to keep its connection (see salvage.py); `salvage_timeout=0` turns
    that off.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int = 100,
        max_idle: int | None = None,
        keepalive_expiry: float | None = 60.0,
        resolve: Resolve | None = None,
        retry_stale: bool = True,
        salvage_bytes: int = SALVAGE_BYTES,
        salvage_timeout: float = SALVAGE_TIMEOUT,
        salvage_contended: float = SALVAGE_CONTENDED,
    ) -> None:
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._ssl_context = ssl_context
        self._resolve = resolve
        self._retry_stale = retry_stale
        self._pool: Pool[Connection] = Pool(
            max_connections, max_connections if max_idle is None else max_idle, keepalive_expiry)
        self._salvage = Salvage(self._pool, salvage_bytes, salvage_timeout, salvage_contended)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- introspection ----

    def pool_stats(self) -> tuple[int, int]:
        """(active, idle) live connections, read by the metrics collector at scrape time."""
        return self._pool.stats()

    @property
    def connections_opened(self) -> int:
        """Connections opened since start (a monotonic counter)."""
        return self._pool.opened

    @property
    def connections_abandoned(self) -> tuple[int, int]:
        """(kept, closed): connections whose caller went away after the request was assigned
        one, by outcome - read to the end and kept, or closed (monotonic counters)."""
        return self._salvage.kept, self._salvage.closed

    async def aclose(self) -> None:
        """Close idle connections now, and those being salvaged; active ones close when their
        response ends."""
        self._pool.close_all()
        await self._salvage.cancel_all()

    # ---- the request path ----

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        extensions = request.extensions
        timeouts = extensions.get("timeout") or _NO_TIMEOUTS
        trace: ConnectTrace | None = extensions.get("trace")
        origin = self._origin(request)
        outgoing = await _prepare(request)
        retried = False
        while True:
            conn, reused, waited = await self._acquire(origin, timeouts, trace, fresh=retried)
            try:
                return await self._exchange(conn, request, outgoing, timeouts, trace, reused, waited)
            except _Stale as stale:
                replayable = outgoing.stream is None
                if not self._retry_stale or not wire.may_retry_on_fresh(
                    request.method, reused, False, True, replayable, retried
                ):
                    raise stale.error from None
                retried = True
                origin = self._origin(request)

    def _origin(self, request: httpx.Request) -> Origin:
        url = request.url
        origin = self._pool.origin((url.raw_scheme, url.raw_host, url.port))
        if origin is None:
            key, tls, name, port = origin_of(url)
            origin = Origin(key, tls, name, port, name)
            self._pool.remember(origin)
        return origin

    async def _acquire(
        self, origin: Origin, timeouts: dict[str, float | None], trace: ConnectTrace | None, fresh: bool
    ) -> tuple[Connection, bool, float]:
        """A connection for `origin`: an idle one, a new one, or one a waiter is handed."""
        pool = self._pool
        if pool.closed:
            raise httpx.ConnectError("the transport is closed")
        loop = self._loop
        assert loop is not None
        if not fresh:
            conn = pool.take_idle(origin, loop.time())
            if conn is not None:
                return conn, True, 0.0
        waited = 0.0
        if not pool.try_reserve(origin):
            started = loop.time()
            try:
                granted = await pool.wait(origin, timeouts.get("pool"))
            except PoolWaitTimeout:
                raise httpx.PoolTimeout("timed out waiting for a free connection slot") from None
            except PoolClosed:
                raise httpx.ConnectError("the transport is closed") from None
            waited = loop.time() - started
            if granted is not None:
                if not fresh and granted.usable():
                    return granted, True, waited
                pool.reclaim(granted)  # dead (or we need a fresh one): its slot is ours
        conn = Connection(loop, origin)
        pool.adopt(conn)  # it holds the slot reserved above
        try:
            await open_connection(conn, origin, self._ssl_context, self._resolve, timeouts.get("connect"), trace)
        except BaseException:
            conn.abort()
            pool.discard(conn)
            raise
        pool.opened += 1
        return conn, False, waited

    async def _exchange(
        self,
        conn: Connection,
        request: httpx.Request,
        outgoing: _Outgoing,
        timeouts: dict[str, float | None],
        trace: ConnectTrace | None,
        reused: bool,
        waited: float,
    ) -> httpx.Response:
        conn.begin(outgoing.head_request)
        try:
            await _send(conn, request, outgoing, timeouts.get("write"), trace)
            if trace is not None:
                await trace("http11.receive_response_headers.started", {"request": request})
            read_timeout = timeouts.get("read")
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                if not await conn.wait(read_timeout):
                    raise httpx.ReadTimeout("timed out waiting for the response headers")
            version = _VERSIONS.get(conn.http_version, b"HTTP/1.1")
            if trace is not None:
                await trace(
                    "http11.receive_response_headers.complete",
                    {"return_value": (version, conn.status, conn.reason, conn.headers)},
                )
        except asyncio.CancelledError:
            # The caller went away (the app disconnected): once the whole request is out, the
            # connection may be worth keeping (salvage.py). The cancellation goes on at once.
            if not self._salvage.take(conn, timeouts.get("read")):
                self._pool.drop(conn)
            raise
        except BaseException as exc:
            self._pool.drop(conn)  # `exc` may be its error: see Connection.forget_error
            if reused and not conn.got_bytes and isinstance(exc, ServerDisconnected):
                raise _Stale(exc) from exc
            raise
        return build_response(
            conn.status,
            conn.headers,
            ResponseStream(conn, self._salvage, timeouts.get("read")),
            {
                "http_version": version,
                "reason_phrase": conn.reason,
                "network_stream": None,
                "egress.reused": reused,
                "egress.pool_wait": waited,
            },
        )


class _Outgoing:
    """A request made ready for the wire once, so a retry sends the very same bytes."""

    __slots__ = ("body", "chunked", "first", "head", "head_request", "length", "stream")

    def __init__(
        self, head: bytes, body: bytes, stream: AsyncIterator[bytes] | None, first: bytes,
        chunked: bool, length: int, head_request: bool,
    ) -> None:
        self.head = head
        self.body = body  # framed bytes sent right after the head (in-memory bodies)
        self.stream = stream  # a body still to be streamed, or None
        self.first = first  # the stream's first chunk, already taken when we peeked
        self.chunked = chunked
        self.length = length
        self.head_request = head_request


async def _prepare(request: httpx.Request) -> _Outgoing:
    """Encode the head and decide the body framing (RFC 9112 section 6).

    Caller's Content-Length: the body is sent as is and must match it. Caller's
    Transfer-Encoding: the body is chunk-framed. Neither: an in-memory body gets a
    Content-Length, a stream is peeked - empty means no body, else chunked.
    """
    headers = request.headers.raw
    framing, length = wire.body_framing(headers)
    body = in_memory_body(request.stream)
    stream: AsyncIterator[bytes] | None = None
    first = b""
    extra: tuple[bytes, bytes] | None = None
    if body is not None:
        if framing is None and body:
            framing, length = wire.Framing.LENGTH, len(body)
            extra = (b"Content-Length", str(length).encode())
        if framing is wire.Framing.CHUNKED:
            body = (wire.chunk_frame(len(body)) + body + b"\r\n" + wire.CHUNKED_END) if body else wire.CHUNKED_END
        elif framing is wire.Framing.LENGTH and len(body) != length:
            raise httpx.LocalProtocolError("request body does not match its Content-Length")
    else:
        stream = request.stream.__aiter__()  # type: ignore[union-attr]
        body = b""
        if framing is None:
            async for chunk in stream:
                if chunk:
                    first = chunk
                    break
            if first:
                framing = wire.Framing.CHUNKED
                extra = (b"Transfer-Encoding", b"chunked")
            else:
                stream = None
    head = wire.encode_head(wire.method_bytes(request.method), request.url.raw_path, headers, extra)
    return _Outgoing(head, body, stream, first, framing is wire.Framing.CHUNKED, length, request.method == "HEAD")


async def _send(
    conn: Connection,
    request: httpx.Request,
    outgoing: _Outgoing,
    write_timeout: float | None,
    trace: ConnectTrace | None,
) -> None:
    if trace is not None:
        await trace("http11.send_request_headers.started", {"request": request})
    if not conn.usable():
        raise conn.error or ServerDisconnected(DISCONNECTED)  # closed before we wrote a byte
    transport = conn.transport
    assert transport is not None
    body = outgoing.body
    transport.write(outgoing.head + body if body else outgoing.head)  # one send for a small request
    stream = outgoing.stream
    conn.request_sent = stream is None
    if trace is not None:
        await trace("http11.send_request_headers.complete", {"return_value": None})
    if stream is not None:
        if trace is not None:
            await trace("http11.send_request_body.started", {"request": request})
        await _send_stream(conn, stream, outgoing.first, outgoing.chunked, outgoing.length, write_timeout)
        if trace is not None:
            await trace("http11.send_request_body.complete", {"return_value": None})
    elif conn.writing_paused and not await conn.drain(write_timeout):
        raise httpx.WriteTimeout("timed out sending the request")


async def _send_stream(
    conn: Connection,
    stream: AsyncIterator[bytes],
    first: bytes,
    chunked: bool,
    length: int,
    write_timeout: float | None,
) -> None:
    """Stream a request body with write-side flow control (wait while the socket is full).

    A server may answer before the body is complete (413, 401...). When that answer is an
    error or closes the connection, stop sending and return quietly: the caller then returns
    that response, and the connection, whose request was cut short, is closed after it.
    """
    sent = 0
    pending = first
    transport = conn.transport
    assert transport is not None
    while True:
        if pending:
            if conn.refused_body:
                return
            if conn.closed:
                if conn.head_done:
                    return
                raise conn.error or httpx.WriteError("connection closed while sending the request body")
            size = len(pending)
            sent += size
            if chunked:
                transport.writelines((wire.chunk_frame(size), pending, b"\r\n"))
            else:
                if sent > length:
                    raise httpx.LocalProtocolError("request body is longer than its Content-Length")
                transport.write(pending)
            if conn.writing_paused and not await conn.drain(write_timeout):
                raise httpx.WriteTimeout("timed out sending the request body")
        try:
            pending = await stream.__anext__()
        except StopAsyncIteration:
            break
    if conn.refused_body:
        return
    if chunked:
        if not conn.closed:
            transport.write(wire.CHUNKED_END)
    elif sent != length:
        raise httpx.LocalProtocolError("request body is shorter than its Content-Length")
    conn.request_sent = True


class ResponseStream(httpx.AsyncByteStream):
    """The response body as it arrives: de-chunked, never decompressed.

    At the end of the body the connection goes back to the pool (if the response allows
    keep-alive). A caller that stops before the end (`aclose`, or cancelled while waiting for
    bytes) hands the connection to the salvage, which reads a small rest and keeps it, or
    closes it: an abandoned download never leaves a connection half-read in the pool.

    `violation` is set, once the body has ended, when the upstream sent bytes after the
    complete response (wire.is_surplus): the body read is exactly the response's, and the
    connection has been closed; the caller may record the upstream's fault.
    """

    __slots__ = ("_conn", "_read_timeout", "_salvage", "violation")

    def __init__(self, conn: Connection, salvage: Salvage, read_timeout: float | None) -> None:
        self._conn: Connection | None = conn
        self._salvage = salvage
        self._read_timeout = read_timeout
        self.violation: str | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def body_ready(self) -> bool:
        """True if the next `__anext__` returns without waiting (bytes in, or the end reached)."""
        conn = self._conn
        return conn is None or bool(conn.chunks) or conn.body_done or conn.error is not None

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            if conn.chunks:
                return conn.take_body()
            if conn.body_done:
                self._conn = None
                if conn.surplus:
                    self.violation = wire.SURPLUS
                self._salvage.pool.finish(conn)
                raise StopAsyncIteration
            if conn.error is not None:
                error = conn.error
                self._drop(conn)
                try:
                    raise error
                finally:
                    # The traceback holds this frame: a local naming the error would make a
                    # cycle (frame -> error -> traceback -> frame) keeping `conn` alive.
                    del error
            try:
                ok = await conn.wait(self._read_timeout)
            except asyncio.CancelledError:
                self._leave(conn)
                raise
            except BaseException:
                self._drop(conn)
                raise
            if not ok:
                self._drop(conn)
                raise httpx.ReadTimeout("timed out reading the response body")

    async def aclose(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.body_done:
            # The whole response came off the wire: the connection is clean, whether or not
            # the caller read every buffered byte.
            self._salvage.pool.finish(conn)
        else:
            self._leave(conn)

    def _leave(self, conn: Connection) -> None:
        """The caller stops reading before the end: salvage the connection, or abort it."""
        self._conn = None
        if not self._salvage.take(conn, self._read_timeout):
            self._salvage.pool.drop(conn)

    def _drop(self, conn: Connection) -> None:
        self._conn = None
        self._salvage.pool.drop(conn)

    def __del__(self) -> None:
        # Safety net: a response dropped without being read to the end or closed would
        # otherwise hold its connection's pool slot for ever.
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closed
                self._drop(conn)
