"""Header rules for both directions. Pure functions over ASGI-style `(name, value)` byte pairs.

Upstream: the app's headers in their order, repeats kept, less the hop-by-hop ones (RFC 9110
7.6.1: Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade, and every
name listed in Connection), with Host set to the destination and route-injected headers
replacing any the app sent. Nothing of the client library's own (no User-Agent, Accept,
Accept-Encoding, cookies). Downstream: the upstream's headers less the hop-by-hop ones.

Framing upstream is the sidecar's own (framing.py decides it): `Transfer-Encoding` goes as
hop-by-hop and comes back as `chunked` when the body is; `Content-Length` goes as its
normalised number; and look-alikes of both (`Transfer_Encoding`, `content_length`) are
dropped. A CGI or WSGI back end maps `_` and `-` alike onto `HTTP_TRANSFER_ENCODING`, so a
look-alike would read there as a second framing beside the real one. Dropped rather than
refused: no HTTP use needs them, nginx (`underscores_in_headers off`) and Apache drop them
the same way, and a set lookup the loop does anyway costs nothing per request.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


# Names a CGI/WSGI back end reads as framing headers; uvicorn lower-cases names, so any case.
FRAMING_LOOKALIKES = frozenset({b"transfer_encoding", b"content_length"})
_DROP_UPSTREAM = HOP_BY_HOP | FRAMING_LOOKALIKES


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Header names the sender listed in `Connection` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def is_upgrade(headers: Sequence[Header]) -> bool:
    """Whether the request asks for a protocol upgrade (WebSocket, h2c): we cannot proxy those."""
    return any(name == b"upgrade" for name, _ in headers)


def upstream_request_headers(
    headers: Sequence[Header],
    host_header: bytes,
    injected: Sequence[tuple[bytes, Callable[[], bytes]]] = (),
    *,
    chunked: bool = False,
    content_length: bytes | None = None,
    via: bool = False,
    forwarded_for: bytes | None = None,
    request_id: bytes | None = None,
) -> list[Header]:
    """The header list to send upstream (see the module docstring for the rules).

    `content_length`, the normalised number (framing.request_framing), takes the place of
    the app's Content-Length; a repeat of it (identical, or framing would have refused it)
    is not sent twice.
    """
    drop = (_DROP_UPSTREAM | connection_tokens(headers) if any(n == b"connection" for n, _ in headers)
            else _DROP_UPSTREAM)
    out: list[Header] = [(b"host", host_header)]
    replaced = {name for name, _ in injected}
    length_sent = False
    for name, value in headers:
        if name in drop or name == b"host" or name in replaced:
            continue
        if name == b"content-length":
            if length_sent or content_length is None:
                continue
            value, length_sent = content_length, True
        out.append((name, value))
    for name, provider in injected:
        out.append((name, provider()))
    if chunked:
        out.append((b"transfer-encoding", b"chunked"))
    if via:
        out.append((b"via", b"1.1 egress-sidecar"))
    if forwarded_for is not None:
        out.append((b"x-forwarded-for", forwarded_for))
    if request_id is not None:
        out.append((b"x-request-id", request_id))
    return out


def request_id_of(headers: Sequence[Header]) -> bytes | None:
    for name, value in headers:
        if name == b"x-request-id":
            return value
    return None


# Request ids need to be unique, not secret: a Mersenne Twister seeded from the OS (per
# process, so forked copies differ) gives 128 bits without a getrandom() syscall per
# request (~1-3 us in a VM; py-spy --native showed it at ~4 % at c256).
_ids = random.Random(os.urandom(32))


def new_request_id() -> bytes:
    """32 random hex digits (128 bits, as many as a uuid4 carries)."""
    return b"%032x" % _ids.getrandbits(128)


def downstream_response_headers(headers: Sequence[Header]) -> list[Header]:
    """The upstream response's headers for the app: hop-by-hop removed, everything else as is."""
    if not any(name.lower() in HOP_BY_HOP for name, _ in headers):
        return list(headers)
    drop = HOP_BY_HOP | connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]
