"""HTTP/2 framing for a client, pure: frame headers, the frames we send, and an HPACK encoder.

RFC 9113 section 4.1: every frame is a 9-byte header (24-bit length, type, flags, 31-bit
stream id) and a payload. Building and parsing them here takes a few struct calls; the `h2`
library spent ~70 us of CPU per request on its state machines and frame objects, which is
why the connection (h2_connection) does its own framing. Header blocks are decoded with
`hpack` (its dynamic table must follow the server's); ours are encoded by `encode_headers`.

HPACK (RFC 7541) on the way out uses only the static table and literals without indexing,
without Huffman coding: no dynamic-table state to keep and no per-byte Python loop. The first
block of a connection starts with a dynamic table size update to 0 (section 6.3), which stays
valid whatever SETTINGS_HEADER_TABLE_SIZE the server announces. The price is a few dozen bytes
per request on the wire.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes (section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x7, 0x8, 0x9
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM",
               8: "CANCEL", 9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM",
               12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}

# Settings (section 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5

DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
MAX_WINDOW = 2**31 - 1

HEAD = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_U32X2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return HEAD.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


def frame_head(kind: int, flags: int, stream_id: int, size: int) -> bytes:
    return HEAD.pack(size >> 8, size & 0xFF, kind, flags, stream_id)


def settings(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(key, value) for key, value in values.items()))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, offset) for offset in range(0, len(payload) - 5, 6)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code))


def u32(payload: bytes, offset: int = 0) -> int:
    return int(_U32.unpack_from(payload, offset)[0])


def u32x2(payload: bytes) -> tuple[int, int]:
    first, second = _U32X2.unpack_from(payload)
    return int(first), int(second)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (and CONTINUATION frames when the block is larger than one frame)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame_head(HEADERS, flags | END_HEADERS, stream_id, len(block)) + block
    parts = [block[i:i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame_head(HEADERS, flags, stream_id, len(parts[0])), parts[0]]
    for index, part in enumerate(parts[1:], 2):
        out += [frame_head(CONTINUATION, END_HEADERS if index == len(parts) else 0, stream_id, len(part)), part]
    return b"".join(out)


def strip_padding(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (and HEADERS' priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ValueError("padded frame without a pad length")
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    if end < start:
        raise ValueError("padding longer than the frame")
    return payload[start:end] if start or end != len(payload) else payload


# ---- HPACK, the encoding side ----

# RFC 7541 appendix A.
_STATIC = [
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"), (b":status", b"200"),
    (b":status", b"204"), (b":status", b"206"), (b":status", b"304"), (b":status", b"400"),
    (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""), (b"access-control-allow-origin", b""),
    (b"age", b""), (b"allow", b""), (b"authorization", b""), (b"cache-control", b""),
    (b"content-disposition", b""), (b"content-encoding", b""), (b"content-language", b""),
    (b"content-length", b""), (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""), (b"from", b""),
    (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""), (b"if-none-match", b""),
    (b"if-range", b""), (b"if-unmodified-since", b""), (b"last-modified", b""), (b"link", b""),
    (b"location", b""), (b"max-forwards", b""), (b"proxy-authenticate", b""), (b"proxy-authorization", b""),
    (b"range", b""), (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
]
_FULL: dict[tuple[bytes, bytes], bytes] = {}
_NAME: dict[bytes, bytes] = {}
for _index, (_name, _value) in enumerate(_STATIC, 1):
    if _value:
        _FULL[(_name, _value)] = bytes([0x80 | _index])  # indexed header field (section 6.1)
    # Literal without indexing, indexed name (section 6.2.2): 4-bit prefix.
    _NAME.setdefault(_name, bytes([_index]) if _index < 15 else bytes([0x0F, _index - 15]))

TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update to 0 (section 6.3)


def _length(size: int) -> bytes:
    """A string length with a 7-bit prefix and the Huffman bit off (section 5.1)."""
    if size < 127:
        return bytes((size,))
    out = bytearray((127,))
    size -= 127
    while size >= 128:
        out.append((size & 0x7F) | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out)


def encode_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block from lower-case names and values, static table and plain literals only."""
    out: list[bytes] = []
    append = out.append
    for name, value in headers:
        indexed = _FULL.get((name, value))
        if indexed is not None:
            append(indexed)
            continue
        prefix = _NAME.get(name)
        if prefix is None:
            append(b"\x00")
            append(_length(len(name)))
            append(name)
        else:
            append(prefix)
        append(_length(len(value)))
        append(value)
    return b"".join(out)
