"""One upstream HTTP/2 connection: an asyncio.Protocol around the `h2` state machine.

The protocol side only turns frames into stream state (head, body chunks, end, error) and wakes
the one coroutine waiting on that stream; the request side (h2_transport) takes every
decision. Writes are batched: what h2 queues while coroutines open streams in one loop turn
leaves in one TLS write (`_schedule_flush`), and what answering frames queue goes out at the
end of `data_received`.

Flow control (RFC 9113 section 5.2): the connection window is raised to CONNECTION_WINDOW and
each stream's to STREAM_WINDOW, and received bytes are acknowledged only as the consumer takes
them (`take_body`), so a slow reader stalls its own stream at STREAM_WINDOW bytes buffered,
and a connection holds at most CONNECTION_WINDOW unread bytes in all.

h2's internals touched (bounded by `h2>=4,<5` through httpx[http2]; checked by
tests/unit/test_h2_connection.py, re-read `H2Connection._receive_goaway_frame` on an upgrade):
on GOAWAY h2 closes its whole state machine and drops its unsent bytes, so the responses of
the streams the server still finishes (nginx sends GOAWAY before the last response) would be
rejected as a protocol error (python-hyper/h2#1181). `_ClientH2` keeps it open and keeps them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

from sidecar.transport.h2_request import Refused, StreamReset

# Our receive windows. 64 KiB (the protocol default) caps one stream at 64 KiB per round trip;
# these let a 1 MiB body arrive in one round trip while bounding what a stalled reader pins.
CONNECTION_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW = 2 * 1024 * 1024
# Streams one connection may carry even if the server allows more (h2's default is unbounded).
MAX_STREAMS = 256
# Past this stream id the connection takes no new streams (ids are 31 bits, never reused).
_LAST_STREAM_ID = 2**31 - 1024

_TIMED_OUT = object()
_WOKEN = None

DISCONNECTED = "Server disconnected without sending a response."
_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    # Headers come from the app through our own header rules, already lower-cased and free of
    # hop-by-hop fields (sidecar.headers); h2's per-header checks would repeat that work.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)


class _ClientH2(h2.connection.H2Connection):
    """h2's client connection, but a received GOAWAY does not end it (see the module docstring)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        pending = self._data_to_send
        result = super()._receive_goaway_frame(frame)
        self._data_to_send = pending  # frames of streams <= last id must still go out
        self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return result


class Stream:
    """One request/response exchange on a connection."""

    __slots__ = ("chunks", "ended", "error", "headers", "id", "status", "unacked", "waiter")

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.chunks: deque[bytes] = deque()
        self.unacked = 0  # flow-controlled bytes received and not yet taken by the consumer
        self.ended = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[object] | None = None


class H2Connection(asyncio.Protocol):
    """Socket and h2 state of one connection and its open streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Any, on_change: Callable[[H2Connection], None]) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.h2 = _ClientH2(config=_CONFIG)
        self.streams: dict[int, Stream] = {}
        self.capacity = 0  # streams the server allows at once; 0 until its SETTINGS came
        self.closing = False  # GOAWAY received or sent: no new stream
        self.closed = False
        self.idle_since = 0.0
        self.reserved = 0  # streams the pool promised to waiters not yet running
        self.ping_handle: asyncio.TimerHandle | None = None
        self.ping_pending = False
        self.writing_paused = False
        self._flush_scheduled = False
        self._ready: asyncio.Future[object] | None = None
        self._window_waiters: list[asyncio.Future[object]] = []
        self._drain_waiter: asyncio.Future[object] | None = None
        # Called when streams free up, capacity changes or the connection ends (the pool's hook).
        self._on_change = on_change

    # ---- starting ----

    async def start(self, timeout: float | None) -> None:
        """Send our preface and settings; return once the server's SETTINGS arrived."""
        h2c = self.h2
        h2c.initiate_connection()
        h2c.update_settings({
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # the server opens no stream to us
        })
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
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

    def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> Stream:
        h2c = self.h2
        stream_id = h2c.get_next_available_stream_id()
        stream = Stream(stream_id)
        self.streams[stream_id] = stream
        h2c.send_headers(stream_id, headers, end_stream=end_stream)
        if stream_id >= _LAST_STREAM_ID:
            self.closing = True
        self._schedule_flush()
        return stream

    async def send_data(self, stream: Stream, data: bytes, end_stream: bool, timeout: float | None) -> None:
        """Send `data` on `stream` as its flow-control windows allow; raises if the stream ended."""
        h2c = self.h2
        view = memoryview(data)
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.ended and stream.headers is not None:
                return  # the server answered in full already: the rest is not wanted
            if self.closed:
                raise StreamReset("connection closed while sending the request body")
            if not view:
                break
            size = min(len(view), h2c.local_flow_control_window(stream.id), h2c.max_outbound_frame_size)
            if size <= 0:
                if not await self._wait_window(timeout):
                    raise httpx.WriteTimeout("timed out waiting for the HTTP/2 flow-control window")
                continue
            h2c.send_data(stream.id, view[:size].tobytes())
            view = view[size:]
            self._schedule_flush()
            if self.writing_paused and not await self._drain(timeout):
                raise httpx.WriteTimeout("timed out sending the request body")
        if end_stream:
            h2c.end_stream(stream.id)
            self._schedule_flush()

    async def wait(self, stream: Stream, timeout: float | None) -> bool:
        """Wait until `stream` has news; False if `timeout` passed first."""
        waiter: asyncio.Future[object] = self.loop.create_future()
        stream.waiter = waiter
        handle = None if timeout is None else self.loop.call_later(timeout, _time_out, waiter)
        try:
            result = await waiter
        finally:
            stream.waiter = None
            if handle is not None:
                handle.cancel()
        return result is not _TIMED_OUT

    def take_body(self, stream: Stream) -> bytes:
        """All buffered body bytes of `stream` as one chunk; hands their window back."""
        chunks = stream.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if stream.unacked and not self.closed:
            self.h2.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
            self._schedule_flush()
        return data

    def finish(self, stream: Stream) -> None:
        """`stream` is over for the transport: forget it; reset it if it is still open
        (RST_STREAM CANCEL: a caller that left mid-response frees its stream, not the connection)."""
        if self.streams.pop(stream.id, None) is None:
            return
        if not self.closed:
            state = self.h2.streams.get(stream.id)
            if state is not None and not state.closed:
                # Still open on our side (response or request body unfinished): h2 would keep
                # counting it against the server's stream limit.
                try:
                    self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
                except h2.exceptions.H2Error:
                    pass
            if stream.unacked:
                # Bytes nobody will read still count against the connection's window.
                self.h2.acknowledge_received_data(stream.unacked, stream.id)
                stream.unacked = 0
            self._schedule_flush()
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
        self.h2.ping(b"egress\x00\x00")
        self._flush()

    def close(self) -> None:
        """Close gracefully (GOAWAY, then TLS close_notify): for idle connections."""
        if self.closed:
            return
        self.closing = True
        try:
            self.h2.close_connection()
            self._flush()
        except h2.exceptions.H2Error:
            pass
        self._end(None)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        self._end(None)
        if self.transport is not None:
            self.transport.abort()

    # ---- writing ----

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

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
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()  # h2 queued a GOAWAY naming the error
            self._fail_all(httpx.RemoteProtocolError(f"HTTP/2 protocol error from upstream: {exc}"))
            self.abort()
            return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    if event.data:
                        stream.chunks.append(event.data)
                    stream.unacked += event.flow_controlled_length
                    _wake(stream)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    _head(stream, event.headers)
            elif kind is h2.events.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended = True
                    _wake(stream)
            elif kind is h2.events.StreamReset:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    code = event.error_code
                    if code == h2.errors.ErrorCodes.REFUSED_STREAM:
                        stream.error = Refused("the server refused the stream (REFUSED_STREAM)")
                    elif not stream.ended:
                        name = getattr(code, "name", code)
                        stream.error = StreamReset(f"the server reset the stream ({name})")
                    _wake(stream)
            elif kind is h2.events.WindowUpdated:
                self._wake_writers()
            elif kind is h2.events.RemoteSettingsChanged:
                self._settings_changed()
            elif kind is h2.events.ConnectionTerminated:
                self._goaway(event.last_stream_id, event.error_code)
            elif kind is h2.events.PingAckReceived:
                self.ping_pending = False
            elif kind is h2.events.TrailersReceived:
                pass  # trailers are not relayed (the app side speaks HTTP/1.1 without them)
        self._flush()

    def _settings_changed(self) -> None:
        ready = not self.capacity
        self.capacity = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)
        self._wake_writers()  # INITIAL_WINDOW_SIZE may have grown the stream windows
        if ready and self._ready is not None and not self._ready.done():
            self._ready.set_result(_WOKEN)
        self._on_change(self)

    def _goaway(self, last_stream_id: int, error_code: Any) -> None:
        """RFC 9113 section 6.8: streams above `last_stream_id` were never processed (replayable);
        those at or below it go on; no new stream starts here."""
        self.closing = True
        for stream_id, stream in self.streams.items():
            if stream_id > last_stream_id and stream.error is None:
                stream.error = Refused(f"the server is closing the connection (GOAWAY, last stream {last_stream_id})")
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

    def _end(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                if exc is not None:
                    error: Exception = StreamReset(str(exc) or repr(exc))
                    error.__cause__ = exc
                elif stream.headers is None:
                    error = StreamReset(DISCONNECTED)
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
        self._on_change(self)

    def _fail_all(self, error: Exception) -> None:
        for stream in self.streams.values():
            if stream.error is None:
                stream.error = error
            _wake(stream)


def _head(stream: Stream, headers: list[tuple[bytes, bytes]]) -> None:
    """Take the response head: `:status` out, the rest kept in order."""
    status = 0
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                status = int(value)
        else:
            kept.append((name, value))
    stream.status = status
    stream.headers = kept
    _wake(stream)


def _wake(stream: Stream) -> None:
    waiter = stream.waiter
    if waiter is not None:
        stream.waiter = None
        if not waiter.done():
            waiter.set_result(_WOKEN)


def _time_out(waiter: asyncio.Future[object]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)
