"""One upstream HTTP/1.1 connection: an asyncio.Protocol that owns the socket's bytes.

The protocol callbacks only move bytes into state (status, headers, body chunks, an error)
and wake the one coroutine waiting on this connection; the waiter takes every decision
(timeouts, errors, reuse). Reading pauses when the buffered body passes HIGH_WATER and
resumes when the consumer drains it, so a slow reader bounds memory instead of growing it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from sidecar.upstream.transport.origin import Origin
from sidecar.upstream.transport.wire import HeadRole, is_surplus, response_head_role, response_keep_alive

# Buffered response body at which the socket stops being read. With uvloop a read is at
# most 256 KiB, so one connection holds at most HIGH_WATER + 256 KiB of body.
HIGH_WATER = 256 * 1024

# Largest response head (status line and headers) or trailer section accepted, as httpcore's
# 100 KiB limit: llhttp has none, so a hostile upstream could otherwise grow a header forever.
MAX_HEAD_BYTES = 100 * 1024

_TIMED_OUT = object()
_WOKEN = None

DISCONNECTED = "Server disconnected without sending a response."


class ServerDisconnected(httpx.RemoteProtocolError):
    """The server closed cleanly (FIN or TLS close_notify, not a reset) before any response
    byte: the signature of a keep-alive connection closed as we reused it."""

_TOO_LARGE = f"response head or trailer section larger than {MAX_HEAD_BYTES} bytes"
_SWITCHED = "the upstream answered 101 Switching Protocols to a request that asked for no upgrade"


class _Stop(Exception):
    """Raised inside an httptools callback to stop parsing (an oversized head, a refused
    status, bytes after the complete response); data_received sorts out what it means."""


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


class Connection(asyncio.Protocol):
    """Socket state of one connection plus the exchange in flight on it (at most one)."""

    __slots__ = (
        "active",
        "body_bytes",
        "body_done",
        "buffered",
        "chunks",
        "closed",
        "deadline",
        "drain_waiter",
        "error",
        "got_bytes",
        "head_bytes",
        "head_done",
        "head_request",
        "header_bytes",
        "headers",
        "http_version",
        "informational",
        "keep_alive",
        "loop",
        "max_buffered",
        "new_parser_needed",
        "on_lost",
        "origin",
        "parser",
        "reading_paused",
        "reason",
        "refused_body",
        "request_sent",
        "requests",
        "status",
        "surplus",
        "timer",
        "timer_at",
        "transport",
        "waiter",
        "writing_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        # The parser holds bound methods of this protocol: a reference cycle, broken when the
        # connection ends (see _teardown). None from then on.
        self.parser: HttpResponseParser | None = HttpResponseParser(self)
        self.http_version = "1.1"  # of the last response head, read after the parser may be gone
        self.closed = False
        # Called with this connection when the peer closes it; set by the pool while it is idle.
        self.on_lost: Callable[[Any], None] | None = None
        self.requests = 0
        # The exchange in flight.
        self.active = False
        self.head_request = False
        self.new_parser_needed = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.head_bytes = 0  # bytes fed since the last body byte (head, framing, trailers)
        self.header_bytes = 0  # size of the header or trailer lines of this message
        self.body_bytes = 0
        self.body_done = False
        self.informational = False
        self.got_bytes = False
        self.keep_alive = False
        self.request_sent = False  # the whole request (with its body) went out
        self.refused_body = False  # an early error response told us to stop sending the body
        self.surplus = False  # bytes came after the complete response (wire.is_surplus)
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.max_buffered = 0
        self.reading_paused = False
        self.writing_paused = False
        self.waiter: asyncio.Future[object] | None = None
        self.drain_waiter: asyncio.Future[object] | None = None
        self.deadline: float | None = None  # when the current wait times out
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # ---- exchange lifecycle (called by the transport) ----

    def begin(self, head_request: bool) -> None:
        """Reset the per-exchange state before a request goes out on this connection."""
        if self.new_parser_needed and self.parser is not None:
            # A HEAD response leaves llhttp waiting for a body that never comes. (A connection
            # already gone keeps no parser: its send fails before any byte goes out.)
            self.parser = HttpResponseParser(self)
            self.new_parser_needed = False
        self.requests += 1
        self.active = True
        self.head_request = head_request
        self.head_done = False
        self.head_bytes = 0
        self.body_bytes = 0
        self.body_done = False
        self.got_bytes = False
        self.keep_alive = False
        self.request_sent = False
        self.refused_body = False
        self.surplus = False
        self.error = None
        self.buffered = 0

    def usable(self) -> bool:
        """Whether a request may be sent on it (the peer has not closed it)."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def abort(self) -> None:
        """Drop the connection now: used when an exchange did not end cleanly."""
        self.active = False
        self.closed = True
        self._teardown()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close gracefully (TLS close_notify): used for idle connections."""
        self.active = False
        self.closed = True
        self._teardown()
        if self.transport is not None:
            self.transport.close()

    def _teardown(self) -> None:
        """Release what would keep a finished connection alive in a reference cycle."""
        # The parser holds our bound methods (its callbacks), so connection and parser form
        # a cycle that refcounting never frees: every discarded connection then waited for a
        # full gc run, with its socket, transport and SSL object (kilobytes of native memory
        # the gc's thresholds do not see) kept alive until then; under resets and aborted
        # downloads that grew RSS by kilobytes per request. No byte is parsed after a close
        # (data_received drops bytes once `active` is off).
        self.parser = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def end_exchange(self) -> bool:
        """The whole response came off the wire: throw away what nobody will read; True if the
        connection may carry another request (the response allows it and the request went out whole)."""
        self.active = False
        self.drop_body()  # resumes reading if it was paused
        return self.keep_alive and self.request_sent

    def fail(self) -> None:
        """The exchange did not end cleanly: abort, and let go of its error and unread bytes."""
        self.abort()
        self.forget_error()  # see forget_error
        self.chunks.clear()

    def forget_error(self) -> Exception | None:
        """Take the stored error when the connection is being dropped because of it.

        The error, once raised, carries a traceback whose frames hold this connection, which
        holds the error: a reference cycle that only the cyclic gc frees. Every connection that
        ended in an error (reset, timeout, aborted download) then kept its socket and TLS
        state (OpenSSL's, native and invisible to the gc's thresholds) until a full
        collection: the RSS growth the soak found. Dropping the reference here breaks it.
        """
        error = self.error
        self.error = None
        return error

    def take_body(self) -> bytes:
        """All buffered body bytes as one chunk; resumes reading if it was paused."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def drop_body(self) -> None:
        """Throw the buffered body bytes away (nobody will read them); resumes reading."""
        self.chunks.clear()
        self.buffered = 0
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    async def wait(self, timeout: float | None) -> bool:
        """Wait until the protocol side has news; False if `timeout` passed first.

        One timer per connection, re-armed lazily: a wait only moves `deadline`, and the
        timer, when it fires early for a later deadline, re-arms itself. Creating and
        cancelling a uvloop timer per wait costs a closing libuv handle, hence one extra,
        non-blocking turn of the event loop per request (measured: 1.5 polls per request
        instead of 1 at concurrency 1).
        """
        waiter: asyncio.Future[object] = self.loop.create_future()
        self.waiter = waiter
        if timeout is not None:
            deadline = self.loop.time() + timeout
            self.deadline = deadline
            timer = self.timer
            if timer is None or self.timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                self.timer = self.loop.call_at(deadline, self._on_timer)
                self.timer_at = deadline
        try:
            result = await waiter
        finally:
            self.waiter = None
            self.deadline = None
        return result is not _TIMED_OUT

    def _on_timer(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None:
            return  # nobody waits: the next wait arms a new timer
        # uvloop timers have millisecond resolution and may fire a little early.
        if self.loop.time() + 0.001 >= deadline:
            waiter = self.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(_TIMED_OUT)
        else:
            self.timer = self.loop.call_at(deadline, self._on_timer)
            self.timer_at = deadline

    async def drain(self, timeout: float | None) -> bool:
        """Wait until the socket's write buffer is below its low mark; False on timeout."""
        while self.writing_paused and not self.closed and not self.refused_body:
            waiter: asyncio.Future[object] = self.loop.create_future()
            self.drain_waiter = waiter
            handle = None if timeout is None else self.loop.call_later(timeout, _time_out, waiter)
            try:
                result = await waiter
            finally:
                self.drain_waiter = None
                if handle is not None:
                    handle.cancel()
            if result is _TIMED_OUT:
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(_WOKEN)

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if is_surplus(self.body_done, self.active):
            # Bytes nobody asked for: the framing of this connection can no longer be trusted.
            self._surplus()
            return
        self.got_bytes = True
        body_before = self.body_bytes
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except HttpParserUpgrade:
            # llhttp's own upgrade stop (on_headers_complete already refuses a 101).
            if self.error is None:
                self.error = httpx.RemoteProtocolError(_SWITCHED)
            self.abort()
            self._wake()
        except HttpParserError as exc:
            if is_surplus(self.body_done, self.active):
                # The parser went on past the complete response, in this same read: a second
                # response, or a body longer than its length. The response stands; the
                # connection goes.
                self._surplus()
                return
            if self.error is None:  # a callback may have set a more precise one
                self.error = httpx.RemoteProtocolError(f"malformed response from upstream: {exc}")
            self.abort()
            self._wake()
        if self.body_done or self.error is not None:
            return
        if self.head_done and self.body_bytes != body_before:
            self.head_bytes = 0  # body bytes came: the framing is making progress
            return
        # Bytes that carried no body: a head or trailer line still incomplete, which httptools
        # accumulates without bound (complete ones are counted in on_header). Checked after
        # feeding, so it buffers at most one read past the limit.
        self.head_bytes += len(data)
        if self.head_bytes > MAX_HEAD_BYTES:
            self.error = httpx.RemoteProtocolError(_TOO_LARGE)
            self.abort()
            self._wake()

    def _surplus(self) -> None:
        if self.active:
            self.surplus = True
        self.keep_alive = False
        self.abort()  # keeps the buffered body of the complete response for its reader
        self._wake()

    def eof_received(self) -> bool:
        return False  # half-closed by the peer: close our side too

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_WOKEN)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # nothing is parsed any more: see _teardown
        if self.active and not self.body_done and self.error is None:
            if self.head_done and exc is None and _delimited_by_close(self.headers):
                # RFC 9112 section 6.3 item 8: no length and not chunked, the body ends
                # where the connection does.
                self.body_done = True
                self.keep_alive = False
            elif exc is not None:
                # A reset, or a TLS alert (a server refusing our client certificate answers
                # the first read with one): ReadError as httpcore raises, with the OSError or
                # ssl.SSLError kept as its cause so the caller can tell a TLS failure apart.
                error = httpx.ReadError(str(exc) or repr(exc))
                error.__cause__ = exc
                self.error = error
            elif not self.head_done:
                self.error = ServerDisconnected(DISCONNECTED)
            else:
                self.error = httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
        self._wake()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_WOKEN)
        on_lost = self.on_lost
        if on_lost is not None:
            on_lost(self)

    # ---- httptools callbacks ----

    def on_message_begin(self) -> None:
        if self.body_done:
            raise _Stop  # a second response in the same read: it must not replace the first
        self.headers = []
        self.reason = b""
        self.header_bytes = 0

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.header_bytes + len(name) + len(value)
        self.header_bytes = size
        if size > MAX_HEAD_BYTES:
            self.error = httpx.RemoteProtocolError(_TOO_LARGE)
            raise _Stop  # stops httptools; data_received turns it into the error above
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # callbacks run only inside parser.feed_data
        status = parser.get_status_code()
        role = response_head_role(status)
        if role is HeadRole.INTERIM:
            # 1xx interim response (100 Continue, 103 Early Hints): skipped, as h11 does.
            self.informational = True
            return
        if role is HeadRole.REFUSED:
            self.error = httpx.RemoteProtocolError(_SWITCHED)
            raise _Stop
        self.status = status
        self.head_done = True
        self.http_version = parser.get_http_version()
        if not self.request_sent and (status >= 400 or not parser.should_keep_alive()):
            # RFC 9112 section 9.6: a client sending a body should watch for an error
            # response and stop sending when the server will not read the rest.
            self.refused_body = True
            waiter = self.drain_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(_WOKEN)
        if self.head_request:
            # Responses to HEAD carry no body whatever their Content-Length says (RFC 9110
            # section 9.3.2); httptools cannot be told so, so the exchange ends here.
            self.body_done = True
            self.keep_alive = response_keep_alive(self.http_version, self.headers)
            self.new_parser_needed = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.body_done:
            raise _Stop  # a body after a HEAD response's head: surplus (data_received)
        self.body_bytes += len(body)
        self.chunks.append(body)
        buffered = self.buffered + len(body)
        self.buffered = buffered
        self.max_buffered = max(self.max_buffered, buffered)
        if buffered >= HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.body_done:
            return
        self.body_done = True
        self.keep_alive = self.parser.should_keep_alive()  # type: ignore[union-attr]
        self._wake()


def _delimited_by_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when the response has neither Content-Length nor chunked Transfer-Encoding."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            return False
        if lowered == b"transfer-encoding" and value.lower().rstrip().endswith(b"chunked"):
            return False
    return True
