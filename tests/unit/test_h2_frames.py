"""HTTP/2 framing and our HPACK encoder, checked against the `hpack` and `hyperframe` libraries."""

from __future__ import annotations

import hpack
from hyperframe.frame import Frame

from sidecar.upstream.transport import h2_frames as f


def test_header_blocks_decode_to_what_was_encoded() -> None:
    headers = [
        (b":method", b"GET"), (b":method", b"PATCH"), (b":scheme", b"https"), (b":path", b"/"),
        (b":path", b"/a?b=c"), (b":authority", b"api.test:8443"), (b"accept-encoding", b"gzip, deflate"),
        (b"user-agent", b"curl/8"), (b"www-authenticate", b"x"), (b"x-custom", b"v" * 300),
        (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-empty", b""),
    ]
    block = f.TABLE_SIZE_ZERO + f.encode_headers(headers)
    assert hpack.Decoder().decode(block, raw=True) == headers


def test_a_large_header_block_is_split_into_continuation_frames() -> None:
    block = f.encode_headers([(b"x-big", b"y" * 40000)])
    data = f.headers_frames(5, block, True, 16384)
    frames, pos = [], 0
    while pos < len(data):
        frame, size = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        frame.parse_body(memoryview(data[pos + 9:pos + 9 + size]))
        frames.append(frame)
        pos += 9 + size
    assert [(fr.type, fr.stream_id, sorted(fr.flags)) for fr in frames] == [
        (1, 5, ["END_STREAM"]), (9, 5, []), (9, 5, ["END_HEADERS"])]
    assert b"".join(fr.data for fr in frames[1:]) == block[16384:]


def test_padding_is_stripped() -> None:
    assert f.strip_padding(f.PADDED, b"\x02abc\x00\x00") == b"abc"
    assert f.strip_padding(f.PADDED | f.PRIORITY_FLAG, b"\x01" + b"\x00" * 5 + b"hi\x00") == b"hi"
    assert f.strip_padding(0, b"abc") == b"abc"
