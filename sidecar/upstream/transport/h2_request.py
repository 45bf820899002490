"""Pure rules of the HTTP/2 request side: the header block, and when a stream may be sent again.

No I/O and no h2 import: unit-tested on plain data (tests/unit/test_h2_request.py).
"""

from __future__ import annotations

import httpx

# RFC 9113 section 8.2.2: connection-specific fields must not appear in HTTP/2; `host` becomes
# `:authority` (section 8.3.1). `te` may only carry "trailers".
_DROPPED = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"})

# How often one request is sent again after the server refused it unprocessed (GOAWAY above its
# last stream id, REFUSED_STREAM). Each replay goes to a connection opened after the refusal,
# so more than a few in a row means the upstream refuses everything: stop and report it.
MAX_REPLAYS = 5


class StreamReset(httpx.ReadError):
    """The server reset the stream (RST_STREAM), or the connection ended under it: classified
    `upstream_reset` (sidecar.errors), retried by the resilience layer under its own rules."""


class Refused(StreamReset):
    """The server did not process the stream (GOAWAY above its last stream id, or
    REFUSED_STREAM): the transport sends it again on another connection, whatever the method."""


class Disconnected(StreamReset):
    """The server closed the connection cleanly (no GOAWAY, no reset) before the stream's head:
    the keep-alive race of HTTP/1.1 (transport.wire.may_retry_on_fresh decides a retry)."""


def request_headers(
    method: bytes, scheme: bytes, authority: bytes, path: bytes, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block: pseudo-headers first, then the request's fields lower-cased and
    in order, without the connection-specific ones. A `host` field wins over `authority` (the
    URL's), as HTTP/1.1 servers see it."""
    block = [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", path or b"/")]
    for name, value in headers:
        name = name.lower()
        if name in _DROPPED:
            if name == b"host":
                block[2] = (b":authority", value)
            continue
        if name == b"te" and value.lower() != b"trailers":
            continue
        block.append((name, value))
    return block


def may_replay(replays: int, body_replayable: bool) -> bool:
    """Whether a stream the server never processed is sent again on another connection.

    Any method: the server did not act on it (RFC 9113 section 8.7). Only while the body can be
    sent again in full (kept up to its limit), and at most MAX_REPLAYS times."""
    return body_replayable and replays < MAX_REPLAYS
