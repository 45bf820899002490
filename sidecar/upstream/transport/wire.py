"""HTTP/1.1 request bytes and the small decisions around them, as pure functions.

No sockets here: the request head, the body framing, chunk frames, and the rule for
retrying a request that met a dead keep-alive connection. Tested directly in
tests/unit/test_transport_wire.py.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import httpx


class Framing(enum.Enum):
    """How the request body is delimited on the wire (RFC 9112 section 6)."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length given by the caller
    CHUNKED = "chunked"  # Transfer-Encoding given by the caller, or added by us


_METHOD_BYTES = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")}

# RFC 9110 section 9.2.2: methods whose repetition has the same effect as one request.
# Only these are retried after a dead keep-alive connection (see `may_retry_on_fresh`).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

CHUNKED_END = b"0\r\n\r\n"
_CRLF = b"\r\n"


def method_bytes(method: str) -> bytes:
    """The method as bytes, without an encode for the common ones."""
    encoded = _METHOD_BYTES.get(method)
    return encoded if encoded is not None else method.encode("ascii")


def body_framing(headers: Sequence[tuple[bytes, bytes]]) -> tuple[Framing | None, int]:
    """The framing the caller chose through its headers, and the Content-Length if any.

    Returns (None, -1) when the caller gave neither header: the transport then decides from
    the body itself. Both headers at once is refused: a peer that honours the other one
    would read a different request boundary (request smuggling, RFC 9112 section 6.3).
    """
    framing: Framing | None = None
    length = -1
    for name, value in headers:
        # The length test keeps the per-header cost to an int compare for every other name.
        size = len(name)
        if size == 14 and name.lower() == b"content-length":
            if framing is Framing.CHUNKED or length >= 0:
                raise httpx.LocalProtocolError("conflicting request framing headers")
            try:
                length = int(value)
            except ValueError:
                raise httpx.LocalProtocolError(f"invalid Content-Length {value!r}") from None
            if length < 0:
                raise httpx.LocalProtocolError(f"invalid Content-Length {value!r}")
            framing = Framing.LENGTH
        elif size == 17 and name.lower() == b"transfer-encoding":
            if framing is Framing.LENGTH:
                raise httpx.LocalProtocolError("conflicting request framing headers")
            framing = Framing.CHUNKED
    return framing, length


def encode_head(
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    extra: tuple[bytes, bytes] | None = None,
) -> bytes:
    """The request line and headers, exactly as given (order, repeats, case), plus `extra`.

    A CR or LF inside a name, value or target would let a caller inject headers or a second
    request: counting line breaks over the finished head catches it in one C-level pass.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    append = parts.append
    for name, value in headers:
        append(name)
        append(b": ")
        append(value)
        append(_CRLF)
    if extra is not None:
        append(extra[0])
        append(b": ")
        append(extra[1])
        append(_CRLF)
    append(_CRLF)
    head = b"".join(parts)
    lines = len(headers) + (3 if extra is not None else 2)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise httpx.LocalProtocolError("CR or LF inside the request target or a header")
    return head


def chunk_frame(size: int) -> bytes:
    """The line that opens a chunk of `size` bytes (the data and a CRLF follow it)."""
    return b"%x\r\n" % size


def may_retry_on_fresh(
    method: str,
    reused: bool,
    got_response_bytes: bool,
    closed_cleanly: bool,
    body_replayable: bool,
    already_retried: bool,
) -> bool:
    """Whether a request that failed on a connection should be sent again on a new one.

    Only for the keep-alive race: a reused connection the server closed cleanly (FIN or TLS
    close_notify: it timed the idle connection out, or restarted) just as we sent on it,
    before any response byte came back. A reset is not that race and is left to the caller's
    retry policy, as are timeouts and failures on a fresh connection. And only when sending
    again is safe: the body can be replayed (empty, or in memory - a consumed stream cannot)
    and the method is idempotent (RFC 9110 section 9.2.2: a client must not retry a
    non-idempotent request automatically; Go's net/http applies the same rule). Once.
    """
    return (
        reused
        and not got_response_bytes
        and closed_cleanly
        and body_replayable
        and not already_retried
        and method in IDEMPOTENT_METHODS
    )


def response_keep_alive(version: str, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a response head lets the connection carry another request (RFC 9112 section 9.3):
    HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def may_salvage(
    request_sent: bool,
    head_request: bool,
    status: int | None,
    version: str,
    headers: Sequence[tuple[bytes, bytes]],
    body_received: int,
    salvage_read: int,
    limit: int,
) -> bool:
    """Whether a connection whose caller went away may still be read to the end and reused.

    Reading the rest of an unwanted response costs a little time and bandwidth; closing the
    connection costs a new TCP and TLS handshake for a later request. Worth it only when the
    connection is sure to be clean and the rest is small:
    - the whole request went out (`request_sent`): a request cut short leaves the server
      waiting for body bytes that never come, so the framing is lost;
    - `status` None: the head has not come yet, so nothing is known against it (the caller
      asks again once it is there);
    - the response must keep the connection alive (`response_keep_alive`), and have no body
      (HEAD, 1xx, 204, 304) or one that ends within `limit` more bytes: by Content-Length
      (`body_received` of it already in), or, chunked, while `salvage_read` (body bytes read
      since the caller left) stays within `limit`. A body delimited by the connection's close
      can never be reused. 101 switches protocols: never.
    """
    if not request_sent:
        return False
    if status is None:
        return True
    if status == 101 or not response_keep_alive(version, headers):
        return False
    if head_request or status < 200 or status in (204, 304):
        return True
    length = -1
    chunked = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.strip().isdigit() or (length >= 0 and int(value) != length):
                return False
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.lower().rstrip().endswith(b"chunked")
            if not chunked:
                return False  # another coding last: the body ends at the close
    if chunked:
        return salvage_read <= limit
    if length >= 0:
        return length - body_received <= limit
    return False


class HeadRole(enum.Enum):
    """What a response head is to the exchange in flight (see `response_head_role`)."""

    INTERIM = "interim"  # 1xx: skipped, the final response follows
    FINAL = "final"  # the response to relay
    REFUSED = "refused"  # a protocol error: the exchange fails, the connection is closed


def response_head_role(status: int) -> HeadRole:
    """Interim (1xx, skipped as h11 does), final, or refused.

    101 Switching Protocols is refused: the sidecar never asks an upstream for an upgrade
    (it refuses upgrade requests and drops `Upgrade` as hop-by-hop), so a 101 is a server
    speaking out of turn, and what follows it is not HTTP: relaying it, with or without the
    bytes after it, would hand the app a response the sidecar cannot frame (RFC 9110 15.2.2).
    """
    if status == 101:
        return HeadRole.REFUSED
    if status < 200:
        return HeadRole.INTERIM
    return HeadRole.FINAL


SURPLUS = "the upstream sent bytes after a complete response; its connection was closed"


def is_surplus(response_complete: bool, exchange_active: bool) -> bool:
    """Whether bytes from the upstream are a surplus: they came after the final response of the
    exchange in flight was complete (a second response in the same read, a body longer than
    its Content-Length, a body after a HEAD response), or while no exchange was in flight.

    HTTP/1.1 has no way to tell such bytes from the answer to the next request (RFC 9112
    section 9.3): reading them as one lets a hostile upstream swap responses (a `304` followed
    by `200 ... POISONED` in one read). So the connection is closed, never reused, and the
    response already complete stands as it is.
    """
    return response_complete or not exchange_active
