"""One upstream HTTP/2 connection: an asyncio.Protocol doing the client side of RFC 9113.

The protocol side only turns frames into stream state (head, body chunks, end, error) and wakes
the one coroutine waiting on that stream; the request side (h2_transport) takes every decision.
Framing and the HPACK encoder are h2_frames' (pure); response header blocks are decoded by
`hpack`, whose dynamic table follows the server's (`Decoder.header_table.dynamic_entries` is
read to know when a block may be cached: `hpack>=4,<5`, tests/unit/test_h2_connection.py). A request's frames are written as it
queues them (HEADERS with an in-memory body in one write); frames answering received ones go
out at the end of `data_received`, window updates and resets at the end of the loop turn.

Flow control (section 5.2): our connection window is CONNECTION_WINDOW and each stream's
STREAM_WINDOW; received bytes are handed back (WINDOW_UPDATE) only as the consumer takes them
(`take_body`), in steps of a quarter window, so a slow reader stalls its own stream at
STREAM_WINDOW bytes buffered and the connection holds at most CONNECTION_WINDOW unread bytes.

GOAWAY (section 6.8): streams above its last stream id were never processed and fail as
`Refused` (the transport sends them again elsewhere); the others go on - nginx sends GOAWAY
*before* the last response it gives on a connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import hpack
import httpx

from sidecar.upstream.transport import h2_frames as f
from sidecar.upstream.transport.h2_request import Disconnected, Refused, StreamReset

# Our receive windows: 64 KiB (the protocol default) caps one stream at 64 KiB per round trip.
CONNECTION_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW = 2 * 1024 * 1024
# Streams one connection may carry even if the server allows more (or sets no limit).
MAX_STREAMS = 256
# Past this stream id the connection takes no new streams (ids are 31 bits, never reused).
_LAST_STREAM_ID = 2**31 - 1024

_TIMED_OUT = object()
_WOKEN = None
_HEAD = f.HEAD
_STREAM_STEP = STREAM_WINDOW // 4
_CONNECTION_STEP = CONNECTION_WINDOW // 4

DISCONNECTED = "Server disconnected without sending a response."

# Response heads by header block, for blocks that use no dynamic table (see `_decode`). Callers
# only read the field lists (build_response copies them).
_HEADS: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}
_MAX_HEADS = 256


class _ConnectionError(Exception):
    """The server broke the protocol: the connection ends with GOAWAY(code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Stream:
    """One request/response exchange on a connection."""

    __slots__ = ("chunks", "deadline", "ended", "error", "headers", "id", "local_closed", "pending_ack",
                 "recv_window", "reset", "send_window", "status", "unacked", "waiter")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.chunks: deque[bytes] = deque()
        self.unacked = 0  # body bytes buffered, not yet taken by the consumer
        self.pending_ack = 0  # bytes taken, not yet handed back to the server
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.local_closed = False  # we sent END_STREAM
        self.ended = False  # the server sent END_STREAM
        self.reset = False  # RST_STREAM either way
        self.error: Exception | None = None
        self.waiter: asyncio.Future[object] | None = None
        self.deadline: float | None = None  # when the current wait times out


class H2Connection(asyncio.Protocol):
    """Socket and HTTP/2 state of one connection and its open streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Any, on_change: Callable[[H2Connection], None]) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.capacity = 0  # streams the server allows at once; 0 until its SETTINGS came
        self.closing = False  # GOAWAY received or sent: no new stream
        self.closed = False
        self.idle_since = 0.0
        self.reserved = 0  # streams the pool promised to waiters not yet running
        self.ping_handle: asyncio.TimerHandle | None = None
        self.ping_pending = False
        self.writing_paused = False
        self._next_id = 1
        self._decoder = hpack.Decoder()
        self._first_block = True
        self._send_window = f.DEFAULT_WINDOW  # connection-level, what we may still send
        self._peer_initial_window = f.DEFAULT_WINDOW
        self._peer_max_frame = f.DEFAULT_FRAME_SIZE
        self._recv_window = max(CONNECTION_WINDOW, f.DEFAULT_WINDOW)
        self._pending_ack = 0
        self._buffer = b""
        self._continuation: tuple[int, int, list[bytes]] | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._ready: asyncio.Future[object] | None = None
        self._window_waiters: list[asyncio.Future[object]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._drain_waiter: asyncio.Future[object] | None = None
        # Called when streams free up, capacity changes or the connection ends (the pool's hook).
        self._on_change = on_change

    # ---- starting ----

    def begin(self) -> None:
        """Send our preface, settings and connection window."""
        self._out += [
            f.PREFACE,
            f.settings({f.HEADER_TABLE_SIZE: 0, f.ENABLE_PUSH: 0, f.MAX_CONCURRENT_STREAMS: 0,
                        f.INITIAL_WINDOW_SIZE: STREAM_WINDOW}),
        ]
        if CONNECTION_WINDOW > f.DEFAULT_WINDOW:  # an increment of 0 is a protocol error
            self._out.append(f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW))
        self._flush()

    async def start(self, timeout: float | None) -> None:
        """`begin`, then wait until the server's SETTINGS arrived (its stream limit with them)."""
        self.begin()
        if self.capacity or self.closed:
            return
        self._ready = self.loop.create_future()
        handle = None if timeout is None else self.loop.call_later(timeout, _time_out, self._ready)
        try:
            result = await self._ready
        finally:
            self._ready = None
            if handle is not None:
                handle.cancel()
        if result is _TIMED_OUT:
            self.abort()
            raise httpx.ConnectTimeout(f"no HTTP/2 SETTINGS from {self.origin.host}:{self.origin.port}")
        if self.closed and not self.capacity:
            raise httpx.ConnectError(f"{self.origin.host}:{self.origin.port} closed the HTTP/2 connection at once")

    # ---- streams (called by the transport) ----

    def free_streams(self) -> int:
        """How many more streams may start on it now."""
        if self.closing or self.closed:
            return 0
        return self.capacity - len(self.streams) - self.reserved

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool, hold: bool = False) -> Stream:
        """Start a stream: its HEADERS go out now, or with the first DATA frame when `hold` (a body
        in memory follows at once: one write for both).

        Written at once rather than at the end of the loop turn: a `call_soon` flush cost ~1 ms
        of latency per request at concurrency 1 (measured through the sidecar, p50 1-2 ms vs
        0.4 ms), more than batching streams of one turn saved at c32-c256.
        """
        stream_id = self._next_id
        self._next_id = stream_id + 2
        if stream_id >= _LAST_STREAM_ID:
            self.closing = True
        stream = Stream(stream_id, self._peer_initial_window)
        stream.local_closed = end_stream
        self.streams[stream_id] = stream
        block = f.encode_headers(headers)
        if self._first_block:
            self._first_block = False
            block = f.TABLE_SIZE_ZERO + block
        self._out.append(f.headers_frames(stream_id, block, end_stream, self._peer_max_frame))
        if not hold:
            self._flush()
        return stream

    async def send_data(self, stream: Stream, data: bytes, end_stream: bool, timeout: float | None) -> None:
        """Send `data` on `stream` as the flow-control windows allow; raises if the stream failed."""
        view = memoryview(data)
        while True:
            error = stream.error
            if error is not None:
                stream.error = None
                try:
                    raise error
                finally:
                    del error  # no frame -> error -> traceback -> frame cycle (gc is frozen)
            if stream.ended or stream.reset:
                return  # the server answered in full (or reset with a response): stop sending
            if self.closed:
                raise StreamReset("connection closed while sending the request body")
            left = len(view)
            size = min(left, self._send_window, stream.send_window, self._peer_max_frame)
            if size <= 0 and left:
                self._flush()  # the HEADERS frame, at least
                if not await self._wait_window(timeout):
                    raise httpx.WriteTimeout("timed out waiting for the HTTP/2 flow-control window")
                continue
            last = size == left
            flags = f.END_STREAM if last and end_stream else 0
            self._out += [f.frame_head(f.DATA, flags, stream.id, size), view[:size].tobytes()] if size else [
                f.frame_head(f.DATA, flags, stream.id, 0)]
            self._send_window -= size
            stream.send_window -= size
            view = view[size:]
            self._flush()
            if last:
                stream.local_closed = end_stream
                return
            if self.writing_paused and not await self._drain(timeout):
                raise httpx.WriteTimeout("timed out sending the request body")

    async def wait(self, stream: Stream, timeout: float | None) -> bool:
        """Wait until `stream` has news; False if `timeout` passed first.

        One timer per connection, re-armed lazily (as the HTTP/1.1 Connection.wait): a wait only
        sets its stream's deadline and moves the timer earlier if it must. A uvloop timer made
        and cancelled per wait costs a closing libuv handle, an extra turn of the loop.
        """
        waiter: asyncio.Future[object] = self.loop.create_future()
        stream.waiter = waiter
        if timeout is not None:
            deadline = self.loop.time() + timeout
            stream.deadline = deadline
            timer = self._timer
            if timer is None or self._timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self.loop.call_at(deadline, self._on_timer)
                self._timer_at = deadline
        try:
            result = await waiter
        finally:
            stream.waiter = None
            stream.deadline = None
        return result is not _TIMED_OUT

    def _on_timer(self) -> None:
        """Time out the waits whose deadline passed; re-arm for the earliest one left."""
        self._timer = None
        now = self.loop.time() + 0.001  # uvloop timers have millisecond resolution
        earliest: float | None = None
        for stream in self.streams.values():
            deadline = stream.deadline
            if deadline is None:
                continue
            if deadline <= now:
                stream.deadline = None
                waiter = stream.waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(_TIMED_OUT)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None and not self.closed:
            self._timer = self.loop.call_at(earliest, self._on_timer)
            self._timer_at = earliest

    def take_body(self, stream: Stream) -> bytes:
        """All buffered body bytes of `stream` as one chunk; hands their window back."""
        chunks = stream.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        size = len(data)
        stream.unacked -= size
        if not stream.ended:
            stream.pending_ack += size
            if stream.pending_ack >= _STREAM_STEP:
                self._out.append(f.window_update(stream.id, stream.pending_ack))
                stream.recv_window += stream.pending_ack
                stream.pending_ack = 0
                self._schedule_flush()
        self._ack_connection(size)
        return data

    def finish(self, stream: Stream) -> None:
        """`stream` is over for the transport: forget it; reset it if it is still open
        (RST_STREAM CANCEL: a caller that left mid-response frees its stream, not the connection)."""
        if self.streams.pop(stream.id, None) is None:
            return
        if not self.closed:
            if not stream.reset and not (stream.ended and stream.local_closed):
                stream.reset = True
                self._out.append(f.rst_stream(stream.id, f.CANCEL))
                self._schedule_flush()
            if stream.unacked:
                self._ack_connection(stream.unacked)  # bytes nobody will read
                stream.unacked = 0
        stream.chunks.clear()
        if not self.streams:
            self.idle_since = self.loop.time()
        self._on_change(self)

    # ---- liveness and closing ----

    def ping(self) -> None:
        """Send a PING; the pool closes the connection if no answer comes back in time."""
        if self.closed:
            return
        self.ping_pending = True
        self._out.append(f.frame(f.PING, 0, 0, b"egress\x00\x00"))
        self._flush()

    def close(self) -> None:
        """Close gracefully (GOAWAY, then TLS close_notify): for idle connections."""
        if self.closed:
            return
        self._out.append(f.goaway(0, f.NO_ERROR))
        self._flush()
        self._end(None)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._end(None)
        if self.transport is not None:
            self.transport.abort()

    # ---- writing ----

    def _ack_connection(self, size: int) -> None:
        pending = self._pending_ack + size
        if pending >= _CONNECTION_STEP and not self.closed:
            self._out.append(f.window_update(0, pending))
            self._recv_window += pending
            pending = 0
            self._schedule_flush()
        self._pending_ack = pending

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if out:
            self._out = []
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def _wait_window(self, timeout: float | None) -> bool:
        waiter: asyncio.Future[object] = self.loop.create_future()
        self._window_waiters.append(waiter)
        handle = None if timeout is None else self.loop.call_later(timeout, _time_out, waiter)
        try:
            return await waiter is not _TIMED_OUT
        finally:
            if handle is not None:
                handle.cancel()

    async def _drain(self, timeout: float | None) -> bool:
        while self.writing_paused and not self.closed:
            waiter: asyncio.Future[object] = self.loop.create_future()
            self._drain_waiter = waiter
            handle = None if timeout is None else self.loop.call_later(timeout, _time_out, waiter)
            try:
                if await waiter is _TIMED_OUT:
                    return False
            finally:
                self._drain_waiter = None
                if handle is not None:
                    handle.cancel()
        return True

    def _wake_writers(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(_WOKEN)

    # ---- asyncio.Protocol ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buffer = self._buffer + data if self._buffer else data
        end = len(buffer)
        pos = 0
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(buffer, pos)
                size = (high << 8) | low
                start = pos + 9
                if end - start < size:
                    break
                pos = start + size
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, buffer[start:pos])
        except _ConnectionError as exc:
            self._fail(exc.code, httpx.RemoteProtocolError(f"HTTP/2 protocol error from upstream: {exc}"))
            return
        self._buffer = buffer[pos:] if pos < end else b""
        self._flush()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != f.CONTINUATION:
            raise _ConnectionError(f.PROTOCOL_ERROR, "header block interrupted")
        if kind == f.DATA:
            self._data(flags, stream_id, payload)
        elif kind == f.HEADERS:
            block = _unpad(flags, payload)
            if flags & f.END_HEADERS:
                self._headers(stream_id, flags, block)
            else:
                self._continuation = (stream_id, flags, [block])
        elif kind == f.WINDOW_UPDATE:
            increment = f.u32(payload) & 0x7FFFFFFF
            if stream_id == 0:
                self._send_window += increment
            else:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    stream.send_window += increment
            self._wake_writers()
        elif kind == f.SETTINGS:
            if not flags & f.ACK:
                self._settings(payload)
        elif kind == f.RST_STREAM:
            self._rst_stream(stream_id, f.u32(payload))
        elif kind == f.PING:
            if flags & f.ACK:
                self.ping_pending = False
            else:
                self._out.append(f.frame(f.PING, f.ACK, 0, payload))
        elif kind == f.GOAWAY:
            last_stream_id, code = f.u32x2(payload)
            self._goaway(last_stream_id & 0x7FFFFFFF, code)
        elif kind == f.CONTINUATION:
            pending = self._continuation
            if pending is None or pending[0] != stream_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, "unexpected CONTINUATION")
            pending[2].append(payload)
            if flags & f.END_HEADERS:
                self._continuation = None
                self._headers(stream_id, pending[1], b"".join(pending[2]))
        elif kind == f.PUSH_PROMISE:
            raise _ConnectionError(f.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # PRIORITY and unknown frame types are ignored (section 5.5).

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, "the server overran the connection window")
        data = _unpad(flags, payload) if flags & f.PADDED else payload
        stream = self.streams.get(stream_id)
        if stream is None or stream.reset:
            self._ack_connection(size)  # a stream we already left: its bytes go back at once
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, "the server overran a stream window")
        if len(data) != size:
            self._ack_connection(size - len(data))  # padding is nobody's to read
        if data:
            stream.chunks.append(data)
            stream.unacked += len(data)
        if flags & f.END_STREAM:
            stream.ended = True
        _wake(stream)

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        head = self._decode(block)  # even for a stream we left: the table must follow the server's
        stream = self.streams.get(stream_id)
        if stream is None or stream.reset:
            return
        if stream.headers is None:
            status, kept = head
            if 100 <= status < 200:
                return  # informational (103 Early Hints...): the final head follows
            stream.status = status
            stream.headers = kept
        # else: trailers, not relayed (the app side speaks HTTP/1.1 without them)
        if flags & f.END_STREAM:
            stream.ended = True
        _wake(stream)

    def _decode(self, block: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
        """(status, fields without pseudo-headers) of a header block.

        A block decoded while the decoder's dynamic table is empty, and leaving it empty, can
        refer to the static table only: the same bytes always mean the same head, so it is kept.
        We announce SETTINGS_HEADER_TABLE_SIZE 0, so a server's table stays empty (nginx indexes
        every response field otherwise): after the first response of each second - `date`
        changes - a head costs a dict lookup instead of a Huffman decode (~25 us).
        """
        table = self._decoder.header_table.dynamic_entries
        if not table:
            head = _HEADS.get(block)
            if head is not None:
                return head
        try:
            fields = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise _ConnectionError(f.COMPRESSION_ERROR, f"bad header block: {exc}") from None
        status = 0
        kept: list[tuple[bytes, bytes]] = []
        for name, value in fields:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
            else:
                kept.append((name, value))
        head = (status, kept)
        if not table and not self._decoder.header_table.dynamic_entries:
            if len(_HEADS) >= _MAX_HEADS:
                _HEADS.clear()
            _HEADS[block] = head
        return head

    def _settings(self, payload: bytes) -> None:
        for key, value in f.parse_settings(payload):
            if key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnectionError(f.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == f.MAX_FRAME_SIZE:
                self._peer_max_frame = value
            elif key == f.MAX_CONCURRENT_STREAMS:
                self.capacity = min(value, MAX_STREAMS)
        self._out.append(f.frame(f.SETTINGS, f.ACK, 0))
        if not self.capacity:
            self.capacity = MAX_STREAMS  # no limit announced
        self._wake_writers()
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(_WOKEN)
        self._on_change(self)

    def _rst_stream(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.reset:
            return
        stream.reset = True
        if code == f.REFUSED_STREAM:
            stream.error = Refused("the server refused the stream (REFUSED_STREAM)")
        elif not stream.ended:
            stream.error = StreamReset(f"the server reset the stream ({f.ERROR_NAMES.get(code, code)})")
        _wake(stream)

    def _goaway(self, last_stream_id: int, code: int) -> None:
        """Streams above `last_stream_id` were never processed (replayable); those at or below it
        go on; no new stream starts here."""
        self.closing = True
        for stream_id, stream in self.streams.items():
            if stream_id > last_stream_id and stream.error is None and not stream.ended:
                stream.reset = True
                stream.error = Refused(
                    f"the server is closing the connection (GOAWAY {f.ERROR_NAMES.get(code, code)}, "
                    f"last stream {last_stream_id})")
                _wake(stream)
        self._on_change(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_WOKEN)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _fail(self, code: int, error: Exception) -> None:
        """A connection error (section 5.4.1): GOAWAY with its code, every open stream fails."""
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error
        self._out.append(f.goaway(0, code))
        self._flush()
        self.abort()

    def _end(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        self._out = []
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                if exc is not None:
                    error: Exception = StreamReset(str(exc) or repr(exc))
                    error.__cause__ = exc
                elif stream.headers is None:
                    error = Disconnected(DISCONNECTED)
                else:
                    error = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
                stream.error = error
            _wake(stream)
        self._wake_writers()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(_WOKEN)
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(_WOKEN)
        if self.ping_handle is not None:
            self.ping_handle.cancel()
            self.ping_handle = None
        if self._timer is not None:
            self._timer.cancel()  # its callback holds this connection
            self._timer = None
        self._on_change(self)


def _unpad(flags: int, payload: bytes) -> bytes:
    try:
        return f.strip_padding(flags, payload)
    except ValueError as exc:
        raise _ConnectionError(f.PROTOCOL_ERROR, str(exc)) from None


def _wake(stream: Stream) -> None:
    waiter = stream.waiter
    if waiter is not None:
        stream.waiter = None
        if not waiter.done():
            waiter.set_result(_WOKEN)


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)
