"""H2Connection against the `h2` library's server side (no sockets): our framing, flow control,
GOAWAY and reset handling checked against an independent implementation of RFC 9113."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from sidecar.upstream.transport import h2_frames as f
from sidecar.upstream.transport.h2_connection import STREAM_WINDOW, H2Connection, Stream
from sidecar.upstream.transport.h2_request import Disconnected, Refused, StreamReset

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"), (b":path", b"/")]


class Origin:
    host, port = "a.test", 443


class Wire:
    """The bytes the client writes, collected for the server (a transport's write side only)."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return False


class Pair:
    """Our client connection wired to an h2 server connection through plain byte hand-offs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_streams: int = 10) -> None:
        self.changes = 0
        self.wire = Wire()
        self.client = H2Connection(loop, Origin(), self._changed)
        self.client.connection_made(self.wire)  # type: ignore[arg-type]
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        self.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        self.client.begin()
        self.to_server()
        self.to_client()
        self.to_server()

    def _changed(self, conn: H2Connection) -> None:
        self.changes += 1

    def to_server(self) -> list[h2.events.Event]:
        self.client._flush()  # what a loop turn would have written
        data, self.wire.sent = bytes(self.wire.sent), bytearray()
        return self.server.receive_data(data)

    def to_client(self) -> None:
        self.client.data_received(self.server.data_to_send())


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def respond(server: h2.connection.H2Connection, stream: Stream, body: bytes = b"ok") -> None:
    server.send_headers(stream.id, [(b":status", b"200"), (b"content-length", str(len(body)).encode())])
    server.send_data(stream.id, body, end_stream=True)


def test_capacity_is_the_servers_stream_limit(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop, max_streams=4)
    assert pair.client.capacity == pair.client.free_streams() == 4
    pair.client.open_stream(GET, end_stream=True)
    assert pair.client.free_streams() == 3


def test_goaway_finishes_streams_up_to_its_last_id_and_refuses_the_others(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    first = pair.client.open_stream(GET, end_stream=True)
    second = pair.client.open_stream(GET, end_stream=True)
    pair.to_server()
    # nginx's order at keepalive_requests: GOAWAY first, then the last response, in one read.
    respond(pair.server, first, b"hello")
    response = pair.server.data_to_send()
    pair.server.close_connection(last_stream_id=first.id)
    pair.client.data_received(pair.server.data_to_send() + response)
    assert (first.status, first.ended, first.error) == (200, True, None)
    assert b"".join(first.chunks) == b"hello"
    assert isinstance(second.error, Refused)
    assert pair.client.closing and pair.client.free_streams() == 0


def test_refused_stream_is_replayable_and_other_resets_are_not(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    refused = pair.client.open_stream(GET, end_stream=True)
    reset = pair.client.open_stream(GET, end_stream=True)
    pair.to_server()
    pair.server.reset_stream(refused.id, h2.errors.ErrorCodes.REFUSED_STREAM)
    pair.server.reset_stream(reset.id, h2.errors.ErrorCodes.INTERNAL_ERROR)
    pair.to_client()
    assert isinstance(refused.error, Refused)
    assert isinstance(reset.error, StreamReset) and not isinstance(reset.error, Refused)
    assert not pair.client.closing  # a stream reset is not the connection's end


def test_window_goes_back_only_as_the_reader_takes_bytes(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    stream = pair.client.open_stream(GET, end_stream=True)
    pair.to_server()
    pair.server.send_headers(stream.id, [(b":status", b"200")])
    for _ in range(64):
        pair.server.send_data(stream.id, b"x" * 16384)
    pair.to_client()
    assert stream.unacked == 1024 * 1024
    pair.to_server()
    assert pair.server.local_flow_control_window(stream.id) == STREAM_WINDOW - 1024 * 1024  # unread: held
    assert len(pair.client.take_body(stream)) == 1024 * 1024
    pair.to_server()
    assert pair.server.local_flow_control_window(stream.id) == STREAM_WINDOW


def test_a_caller_leaving_resets_its_stream_with_cancel_and_keeps_the_connection(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pair = Pair(loop)
    stream = pair.client.open_stream(GET, end_stream=True)
    pair.to_server()
    pair.server.send_headers(stream.id, [(b":status", b"200")])
    pair.server.send_data(stream.id, b"partial")
    pair.to_client()
    pair.client.finish(stream)
    events = pair.to_server()
    resets = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [(stream.id, h2.errors.ErrorCodes.CANCEL)]
    assert not pair.client.closing and pair.client.free_streams() == 10


def test_large_response_heads_arrive_through_continuation_frames(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    stream = pair.client.open_stream(GET + [(b"x-big-request", b"q" * 40000)], end_stream=True)
    events = pair.to_server()
    [received] = [e for e in events if isinstance(e, h2.events.RequestReceived)]
    assert (b"x-big-request", b"q" * 40000) in received.headers
    pair.server.send_headers(stream.id, [(b":status", b"200"), (b"x-big", b"z" * 40000)], end_stream=True)
    pair.to_client()
    assert stream.status == 200 and stream.ended
    assert stream.headers == [(b"x-big", b"z" * 40000)]


def test_heads_decode_right_whether_the_server_indexes_fields_or_not(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    streams = [pair.client.open_stream(GET, end_stream=True) for _ in range(4)]
    pair.to_server()
    # The h2 library's server indexes fields: later blocks refer to its dynamic table.
    for index, stream in enumerate(streams[:2]):
        pair.server.send_headers(stream.id, [(b":status", b"200"), (b"x-n", str(index).encode())], end_stream=True)
    pair.to_client()
    assert [s.headers for s in streams[:2]] == [[(b"x-n", b"0")], [(b"x-n", b"1")]]
    # nginx's way: no indexing, the same bytes for the same head (kept after the first decode).
    fresh = Pair(loop)
    more = [fresh.client.open_stream(GET, end_stream=True) for _ in range(3)]
    fresh.to_server()
    heads = [[(b":status", b"200"), (b"date", b"Thu, 03 Dec 2026 09:00:0%d GMT" % (i // 2))] for i in range(3)]
    fresh.client.data_received(b"".join(
        f.headers_frames(stream.id, f.encode_headers(head), True, 16384) for stream, head in zip(more, heads, strict=True)))
    assert [(s.status, s.headers, s.ended) for s in more] == [(200, head[1:], True) for head in heads]


def test_waits_time_out_on_one_connection_timer_each_at_its_own_deadline(loop: asyncio.AbstractEventLoop) -> None:
    pair = Pair(loop)
    slow, fast, answered = (pair.client.open_stream(GET, end_stream=True) for _ in range(3))

    async def main() -> list[bool]:
        waits = [asyncio.ensure_future(pair.client.wait(stream, timeout))
                 for stream, timeout in ((slow, 0.3), (fast, 0.05), (answered, 0.05))]
        await asyncio.sleep(0)
        pair.to_server()
        respond(pair.server, answered)
        pair.to_client()
        return list(await asyncio.gather(*waits))

    started = loop.time()
    assert loop.run_until_complete(main()) == [False, False, True]
    assert 0.3 <= loop.time() - started < 2


def test_a_clean_close_fails_streams_without_a_head_as_disconnected_and_others_as_cut_short(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pair = Pair(loop)
    waiting, reading = pair.client.open_stream(GET, True), pair.client.open_stream(GET, True)
    pair.to_server()
    pair.server.send_headers(reading.id, [(b":status", b"200")])
    pair.to_client()
    pair.client.connection_lost(None)  # FIN or close_notify, no GOAWAY
    assert isinstance(waiting.error, Disconnected)
    assert not isinstance(reading.error, StreamReset) and "complete message body" in str(reading.error)
