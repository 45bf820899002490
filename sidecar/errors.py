"""Errors the sidecar itself produces: one table of kinds, one function mapping exceptions to them.

Each kind has a status chosen on purpose (see DESIGN.md "Errors the sidecar produces"), a
one-line body and, where waiting helps, a Retry-After. Every producer of an error response
goes through `classify` and `ERRORS`, so the header, the body, the log and the metric agree.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from sidecar._compat.h2 import is_connection_end as h2_connection_end


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    message: str
    retry_after: int | None = None
    # Close the app's connection after answering: what follows on it cannot be trusted
    # (an upgrade's other protocol, an unparsed body) or the sidecar is going away.
    close: bool = False


ERRORS: dict[str, ErrorSpec] = {
    "bad_request": ErrorSpec(400, "the request cannot be parsed or its framing is ambiguous", close=True),
    "no_route": ErrorSpec(404, "no route matches and the request names no usable host"),
    "loop": ErrorSpec(508, "the request is addressed to the sidecar itself"),
    "denied_host": ErrorSpec(403, "egress to this host is denied by policy"),
    "denied_ip": ErrorSpec(403, "egress to this address is denied by policy"),
    "denied_port": ErrorSpec(403, "CONNECT to this port is denied by policy"),
    "header_too_large": ErrorSpec(431, "request headers are too large or too many", close=True),
    "uri_too_long": ErrorSpec(414, "the request target is too long", close=True),
    "connect_error": ErrorSpec(502, "could not connect to the upstream"),
    "tls_error": ErrorSpec(502, "TLS handshake with the upstream failed"),
    "protocol_error": ErrorSpec(502, "the upstream sent an invalid response"),
    "upstream_reset": ErrorSpec(502, "the upstream closed the connection before responding"),
    "connect_timeout": ErrorSpec(504, "timed out connecting to the upstream"),
    "read_timeout": ErrorSpec(504, "timed out waiting for the upstream"),
    "write_timeout": ErrorSpec(504, "timed out sending the request upstream"),
    "pool_timeout": ErrorSpec(503, "no upstream connection became free in time", retry_after=1),
    "overloaded": ErrorSpec(503, "too many requests in flight", retry_after=1),
    "circuit_open": ErrorSpec(503, "the upstream is failing; the circuit is open", retry_after=5),
    "draining": ErrorSpec(503, "the sidecar is shutting down", retry_after=1, close=True),
    "unsupported": ErrorSpec(
        501, "not supported: protocol upgrades, transfer codings other than chunked", close=True
    ),
    "client_timeout": ErrorSpec(408, "the client was too slow sending its request", close=True),
    "internal": ErrorSpec(500, "internal sidecar error"),
}


# How a CONNECT tunnel ends when the policy refuses it after its 200 (tunnel.py): the first
# client bytes are not TLS, carry no SNI for a named host, or name another host. Each is a
# tunnel outcome and a reason of egress_denied_total.
TUNNEL_REFUSALS = frozenset({"sni_mismatch", "no_sni", "not_tls"})


class EgressError(Exception):
    """An error with a named kind from ERRORS; `detail` goes to the log, never to metrics labels."""

    def __init__(
        self, kind: str, detail: str = "", subject: str | None = None, retry_after: int | None = None
    ) -> None:
        assert kind in ERRORS, kind
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        # What the body may name (a denied host), already validated by routing; never an address list.
        self.subject = subject
        # Overrides the kind's fixed Retry-After when the producer knows better (an open circuit's
        # remaining cooldown).
        self.retry_after = retry_after


class ClientDisconnected(Exception):
    """The app closed its connection; nothing can be sent back to it."""


class NameNotResolved(OSError):
    """The upstream's name has no address (the resolver's error, with the name it was asked).

    Still a `connect_error` (an OSError, so every transport maps it as before); the response
    body says the name did not resolve rather than "could not connect".
    """

    def __init__(self, host: str, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.host = host


def error_subject(exc: BaseException) -> str | None:
    """What the one-line error body may add about `exc`: an EgressError's subject, or the name
    that did not resolve (found in the chain of exceptions the transports wrapped it in)."""
    if isinstance(exc, EgressError):
        return exc.subject
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            return None
        if isinstance(current, NameNotResolved):
            return f"{current.host} does not resolve: {current.strerror}"
        # httpcore's pool re-raises with `raise exc from None`, which drops the cause its network
        # backend (sidecar/policy/guard.py) set but keeps it as the context. Only that explicit form is
        # followed: an implicit context (an error raised while handling an earlier one, say a
        # retry) is another failure, not this one's cause.
        if current.__cause__ is None and current.__suppress_context__:
            current = current.__context__
        else:
            current = current.__cause__
    return None


def _is_tls_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # SSLWantRead/WriteError only mean "needs more bytes": on asyncio's SSL transport a peer
        # reset mid-handshake is raised with one as its __context__; that is a reset, not TLS.
        if isinstance(current, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
            return False
        if isinstance(current, ssl.SSLError):
            return True
        text = str(current)
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text and "handshake" in text.lower():
            return True
        current = current.__cause__ or current.__context__
    return False


def classify(exc: BaseException) -> str:
    """Map an exception raised while proxying to an error kind (the one place that does)."""
    if isinstance(exc, EgressError):
        return exc.kind
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_timeout"
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect_timeout"
    if isinstance(exc, httpx.ReadTimeout):
        return "read_timeout"
    if isinstance(exc, httpx.WriteTimeout):
        return "write_timeout"
    if isinstance(exc, httpx.ConnectError):
        return "tls_error" if _is_tls_failure(exc) else "connect_error"
    if isinstance(exc, httpx.ProtocolError) and h2_connection_end(exc):
        return "upstream_reset"
    if isinstance(exc, httpx.RemoteProtocolError):
        # h11/httptools say "Server disconnected without sending a response" when the
        # peer closed before the status line: that is a reset, not a malformed response.
        text = str(exc).lower()
        return "upstream_reset" if "disconnected" in text or "connection closed" in text else "protocol_error"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, ConnectionError)):
        # A TLS 1.3 server checks the client certificate after the client's handshake is done:
        # its alert (e.g. certificate required) arrives on the first read.
        return "tls_error" if _is_tls_failure(exc) else "upstream_reset"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "bad_request"
    if isinstance(exc, httpx.ProtocolError):
        return "protocol_error"
    if isinstance(exc, OSError):
        return "connect_error"
    return "internal"


def error_head(
    kind: str, subject: str | None = None, retry_after: int | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and one-line body of the response for an error kind."""
    spec = ERRORS[kind]
    if retry_after is None:
        retry_after = spec.retry_after
    about = f" ({subject})" if subject else ""
    body = f"egress-sidecar: {kind}: {spec.message}{about}\n".encode("ascii", "replace")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"x-egress-error", kind.encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if spec.close:
        headers.append((b"connection", b"close"))
    return spec.status, headers, body
