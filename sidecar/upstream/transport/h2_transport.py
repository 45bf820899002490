"""`H2Transport`: an httpx transport for HTTP/2 upstreams on asyncio protocols and `h2`.

Why our own: through httpcore an HTTP/2 request cost this proxy ~0.9 ms of CPU (five times the
HTTP/1.1 path), and the streams still open when a server rolls its connection over with GOAWAY
(nginx does every `keepalive_requests`) failed. Here:
- one connection per origin carries up to the server's SETTINGS_MAX_CONCURRENT_STREAMS streams;
  a second opens only when it is full; requests wait for a stream in FIFO order up to the pool
  timeout (h2_pool);
- a stream the server never processed - above the last stream id of its GOAWAY, or refused with
  REFUSED_STREAM - is sent again on another connection whatever its method (RFC 9113 sections
  6.8 and 8.7), with its body kept up to `replay_body_bytes`; past that the request fails as
  `upstream_reset` before any response byte reached the app. Each replay calls `on_replay`;
- a caller that stops reading (the app left) resets its stream (RST_STREAM CANCEL), never the
  connection;
- when ALPN selects http/1.1 for an origin, its requests go to `fallback` (the HTTP/1.1
  transport) from then on, said once in the log.
The connect path (resolve through the policy, TCP, TLS, trace events) is connect.py's, shared
with the HTTP/1.1 transport. `h2` is imported with the first connection (start-up cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx
import structlog

from sidecar._compat.httpx import build_response, in_memory_body
from sidecar.upstream.transport.connect import ConnectTrace, Resolve, open_connection
from sidecar.upstream.transport.h2_pool import CONNECT, RETRY, H2Origin, H2Pool, PoolClosed, PoolWaitTimeout
from sidecar.upstream.transport.h2_request import (
    Disconnected,
    Refused,
    StreamReset,
    may_replay,
    request_headers,
)
from sidecar.upstream.transport.origin import origin_of
from sidecar.upstream.transport.replay import ReplayableBody
from sidecar.upstream.transport.wire import may_retry_on_fresh

if TYPE_CHECKING:
    from sidecar.upstream.transport.h2_connection import H2Connection, Stream

log = structlog.get_logger("egress.transport")

_NO_TIMEOUTS: dict[str, float | None] = {}
_ALPN = frozenset({"h2", "http/1.1"})
_HTTP2 = b"HTTP/2"
PING_INTERVAL = 15.0


class _UseHTTP11(Exception):
    """The origin speaks only HTTP/1.1 (ALPN, or plain http without TLS)."""


class H2Transport(httpx.AsyncBaseTransport):
    """HTTP/2 over TLS with multiplexed, pooled connections (see the module docstring).

    `ssl_context` must offer h2 (and http/1.1, to fall back); `fallback` builds, at its first
    use, the transport for origins whose server selects http/1.1 and for plain-http origins
    (its own context offering http/1.1 only, so an upstream that later gains HTTP/2 still
    works through it).
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        fallback: Callable[[], httpx.AsyncBaseTransport],
        *,
        max_connections: int = 100,
        keepalive_expiry: float | None = 60.0,
        resolve: Resolve | None = None,
        replay_body_bytes: int = 65536,
        on_replay: Callable[[httpx.Request, str], None] | None = None,
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self._ssl_context = ssl_context
        self._build_fallback = fallback
        self._fallback: httpx.AsyncBaseTransport | None = None
        self._resolve = resolve
        self._replay_body_bytes = replay_body_bytes
        self._on_replay = on_replay
        self._pool = H2Pool(max_connections, keepalive_expiry, ping_interval)
        self.abandoned = 0  # streams reset because the caller left (their connection kept)

    # ---- introspection ----

    def pool_stats(self) -> tuple[int, int]:
        """(active, idle) HTTP/2 connections plus the fallback's."""
        active, idle = self._pool.stats()
        more = getattr(self._fallback, "pool_stats", None)
        if more is not None:
            fallback_active, fallback_idle = more()
            return active + fallback_active, idle + fallback_idle
        return active, idle

    @property
    def connections_opened(self) -> int:
        return self._pool.opened + getattr(self._fallback, "connections_opened", 0)

    @property
    def connections_abandoned(self) -> tuple[int, int]:
        """(kept, closed): a caller leaving mid-response costs its stream only (kept)."""
        kept, closed = getattr(self._fallback, "connections_abandoned", (0, 0))
        return kept + self.abandoned, closed

    async def aclose(self) -> None:
        self._pool.close_all()
        if self._fallback is not None:
            await self._fallback.aclose()

    def _http11(self) -> httpx.AsyncBaseTransport:
        fallback = self._fallback
        if fallback is None:
            fallback = self._fallback = self._build_fallback()
        return fallback

    # ---- the request path ----

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = self._origin(request)
        if origin.http1:
            return await self._http11().handle_async_request(request)
        extensions = request.extensions
        timeouts = extensions.get("timeout") or _NO_TIMEOUTS
        trace: ConnectTrace | None = extensions.get("trace")
        url = request.url
        headers = request_headers(
            request.method.encode("ascii"), url.raw_scheme, url.netloc, url.raw_path, request.headers.raw
        )
        body = _Body(request.stream, self._replay_body_bytes)
        replays = 0
        retried = False
        while True:
            try:
                conn, reused, waited = await self._acquire(origin, timeouts, trace)
            except _UseHTTP11:
                return await self._http11().handle_async_request(request)
            stream = conn.open_stream(headers, body.empty, hold=body.data is not None and not body.empty)
            try:
                return await self._exchange(conn, stream, request, body, timeouts, trace, reused, waited)
            except Refused as refused:
                if not may_replay(replays, body.replayable):
                    raise StreamReset(f"{refused} and the request cannot be sent again") from None
                replays += 1
                if self._on_replay is not None:
                    self._on_replay(request, "goaway")
            except Disconnected:
                # The keep-alive race, as on HTTP/1.1: once, idempotent methods only.
                if not may_retry_on_fresh(request.method, reused, False, True, body.replayable, retried):
                    raise
                retried = True

    def _origin(self, request: httpx.Request) -> H2Origin:
        url = request.url
        origin = self._pool.origins.get((url.raw_scheme, url.raw_host, url.port))
        if origin is None:
            key, tls, name, port = origin_of(url)
            origin = H2Origin(key, tls, name, port, name)
            origin.http1 = not origin.tls  # HTTP/2 is negotiated by ALPN only (no h2c)
            self._pool.origins[key] = origin
        return origin

    async def _acquire(
        self, origin: H2Origin, timeouts: dict[str, float | None], trace: ConnectTrace | None
    ) -> tuple[H2Connection, bool, float]:
        """A connection with a stream for us: a free one, one handed over in turn, or a new one."""
        pool = self._pool
        if pool.closed:
            raise httpx.ConnectError("the transport is closed")
        conn = pool.pick(origin)
        if conn is not None:
            return conn, True, 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        pool_timeout = timeouts.get("pool")
        deadline = None if pool_timeout is None else started + pool_timeout
        may_connect = pool.reserve_connect(origin)
        while True:
            if may_connect:
                conn = await self._connect(origin, timeouts, trace)
                # The streams we do not take go to the waiters; ours is opened right after the
                # return, with no await in between.
                conn.reserved += 1
                pool.dispatch(origin)
                conn.reserved -= 1
                return conn, False, loop.time() - started
            try:
                granted = await pool.wait(origin, loop, deadline)
            except PoolWaitTimeout:
                raise httpx.PoolTimeout("timed out waiting for a free HTTP/2 stream") from None
            except PoolClosed:
                raise httpx.ConnectError("the transport is closed") from None
            if granted is CONNECT:
                may_connect = True
            elif granted is RETRY:
                if origin.http1:
                    raise _UseHTTP11()
                conn = pool.pick(origin)
                if conn is not None:
                    return conn, True, loop.time() - started
                may_connect = pool.reserve_connect(origin)
            else:
                pool.take_reserved(granted)
                if granted.free_streams() >= 0 and not granted.closing:
                    return granted, True, loop.time() - started
                pool.dispatch(origin)
                may_connect = pool.reserve_connect(origin)

    async def _connect(self, origin: H2Origin, timeouts: dict[str, float | None], trace: ConnectTrace | None) -> H2Connection:
        """Open a connection (the pool counted it already); hand it over once its settings came."""
        from sidecar.upstream.transport.h2_connection import H2Connection  # imports h2: first connection only

        pool = self._pool
        loop = asyncio.get_running_loop()
        conn = H2Connection(loop, origin, pool.changed)
        timeout = timeouts.get("connect")
        try:
            await open_connection(conn, origin, self._ssl_context, self._resolve, timeout, trace, _ALPN)
            tls = conn.transport
            assert tls is not None
            ssl_object = tls.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                self._fall_back(origin)
                tls.close()
                raise _UseHTTP11()
            await conn.start(timeout)
        except BaseException:
            conn.abort()
            pool.connect_failed(origin)
            raise
        pool.connected(origin, conn)
        return conn

    def _fall_back(self, origin: H2Origin) -> None:
        if not origin.http1:
            origin.http1 = True
            log.warning(f"{origin.host}:{origin.port} offers no HTTP/2 (ALPN chose http/1.1): using HTTP/1.1 for it",
                        upstream=f"{origin.host}:{origin.port}")
        for waiter in list(origin.waiters):
            if not waiter.done():
                waiter.set_result(RETRY)
        origin.waiters.clear()

    async def _exchange(
        self, conn: H2Connection, stream: Stream, request: httpx.Request, body: _Body,
        timeouts: dict[str, float | None], trace: ConnectTrace | None, reused: bool, waited: float,
    ) -> httpx.Response:
        try:
            if trace is not None:
                await trace("http2.send_request_headers.complete", {"request": request})
            if not body.empty:
                await body.send(conn, stream, timeouts.get("write"))
            read_timeout = timeouts.get("read")
            while stream.headers is None:
                error = stream.error
                if error is not None:
                    stream.error = None  # the raised error's traceback would hold the stream
                    try:
                        raise error
                    finally:
                        del error  # see ResponseStream.__anext__: no frame -> error -> frame cycle
                if not await conn.wait(stream, read_timeout):
                    raise httpx.ReadTimeout("timed out waiting for the response headers")
            if trace is not None:
                await trace("http2.receive_response_headers.complete", {"request": request})
        except asyncio.CancelledError:
            self.abandoned += 1
            conn.finish(stream)  # RST_STREAM CANCEL: the connection goes on
            raise
        except BaseException:
            conn.finish(stream)
            raise
        return build_response(
            stream.status,
            stream.headers,
            H2ResponseStream(self, conn, stream, timeouts.get("read")),
            {
                "http_version": _HTTP2,
                "network_stream": None,
                "egress.reused": reused,
                "egress.pool_wait": waited,
            },
        )


class _Body:
    """A request body, sent per try: bytes in memory, or a stream kept for replays up to a limit."""

    __slots__ = ("data", "empty", "kept")

    def __init__(self, stream: object, limit: int) -> None:
        data = in_memory_body(stream)
        self.data = data
        self.kept: ReplayableBody | None = None
        if data is None:
            self.kept = ReplayableBody(stream, limit)  # type: ignore[arg-type]
        self.empty = data is not None and not data

    @property
    def replayable(self) -> bool:
        return self.kept is None or self.kept.replayable

    async def send(self, conn: H2Connection, stream: Stream, write_timeout: float | None) -> None:
        if self.data is not None:
            await conn.send_data(stream, self.data, True, write_timeout)
            return
        assert self.kept is not None
        async for chunk in self.kept:
            if chunk:
                await conn.send_data(stream, chunk, False, write_timeout)
        await conn.send_data(stream, b"", True, write_timeout)


class H2ResponseStream(httpx.AsyncByteStream):
    """The response body as it arrives; each take hands its flow-control window back."""

    __slots__ = ("_conn", "_read_timeout", "_stream", "_transport")

    def __init__(self, transport: H2Transport, conn: H2Connection, stream: Stream, read_timeout: float | None) -> None:
        self._transport = transport
        self._conn: H2Connection | None = conn
        self._stream = stream
        self._read_timeout = read_timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    def body_ready(self) -> bool:
        """True if the next `__anext__` returns without waiting."""
        stream = self._stream
        return self._conn is None or bool(stream.chunks) or stream.ended or stream.error is not None

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        stream = self._stream
        while True:
            if stream.chunks:
                return conn.take_body(stream)
            if stream.ended:
                self._end(conn)
                raise StopAsyncIteration
            error = stream.error
            if error is not None:
                stream.error = None
                self._end(conn)
                try:
                    raise error
                finally:
                    del error  # see ResponseStream.__anext__: no frame -> error -> frame cycle
            try:
                ok = await conn.wait(stream, self._read_timeout)
            except asyncio.CancelledError:
                self._transport.abandoned += 1
                self._end(conn)
                raise
            if not ok:
                self._end(conn)
                raise httpx.ReadTimeout("timed out reading the response body")

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:
            if not self._stream.ended:
                self._transport.abandoned += 1
            self._end(conn)

    def _end(self, conn: H2Connection) -> None:
        self._conn = None
        conn.finish(self._stream)

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(RuntimeError):
                self._end(conn)
