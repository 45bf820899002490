"""Limits against abuse from inside the pod: oversized request heads and slow clients.

uvicorn's httptools protocol caps neither the request target nor the size or number of
header fields, and has no deadline for a request head (its only timer is keep-alive, armed
after a response): one slow or hostile client in the pod could pin connections and memory
forever. `LimitedHttpToolsProtocol` is uvicorn's protocol with these checks, each answered
in our error format (errors.py), then the connection is closed, and reported to the observer
(log line, metric) like every other sidecar error:

| check                                                        | answer                      |
|--------------------------------------------------------------|-----------------------------|
| request target longer than `limits.max_request_line` bytes   | 414 `uri_too_long`          |
| more than `limits.max_headers` fields, or more than          | 431 `header_too_large`      |
| `limits.max_header_bytes` of names and values                |                             |
| head still incomplete `limits.header_timeout` after the      | 408 `client_timeout`        |
| connection opened (first request) or after its first bytes   |                             |
| a new connection that sent nothing within `header_timeout`   | closed without an answer    |
| anything httptools cannot parse                              | 400 `bad_request`           |
| framing in doubt, or a transfer coding but one `chunked`     | 400 / 501 (framing.py)      |

414 rather than 431 for the target: RFC 9110 15.5.15 names exactly this case, and it tells
the app which part of its request to shorten. A silent connection gets no 408 (RFC 9112
9.5): the client may be about to send on it, and would read the 408 as its answer.

httptools hands a header to `on_header` only once it is complete, buffering it meanwhile; so
`data_received` also bounds the bytes of a head that is still open (one giant header line
cannot grow without end). That count is per read, so with pipelining it may include the
tail of the previous request: it errs towards refusing, by at most one read, and only for a
head already near the limit.

Hot path: the common request head arrives in one read and arms no timer; the checks are a
few integer operations per request, none per header (bench/micro/limits_overhead.py measures it),
plus framing.request_framing's one pass over the header names (~0.6 us for 12 fields).

Two request-target forms uvicorn does not serve are handled here too (RFC 9112 3.2):
absolute-form keeps its URI in the scope's `raw_path` for routing (uvicorn keeps only the
path), and a CONNECT (authority-form) gets no ASGI cycle: once its head is parsed the
connection is handed to `tunnels` (tunnel.py), which owns it from then on.

The body idle timeout lives in forward.RequestBody: only there is it known that the sidecar
is waiting for the client, and not the client for a slow upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Protocol

import httptools

from sidecar._compat.uvicorn import HttpToolsProtocol, adopt
from sidecar.config import Limits
from sidecar.errors import ERRORS, EgressError, error_head
from sidecar.exchange import Exchange
from sidecar.ingress.framing import parse_error_kind, request_framing
from sidecar.ingress.writer import ProxyCycle
from sidecar.observe.observer import Observer


class Tunnels(Protocol):
    """What the protocol needs of tunnel.Tunnels (not imported: tunnel.py imports this module)."""

    def connect(self, client: asyncio.Transport, authority: bytes, buffered: bytes) -> None:
        """Take over `client`, whose `CONNECT authority` head is parsed; `buffered`: bytes after it."""

# report(kind, method, target, detail): called once per refused request or connection.
Report = Callable[[str, str, str, str], None]

# Per header line on the wire beyond name and value: ": " and CRLF.
_LINE_OVERHEAD = 4
# The request line beyond the target (method, spaces, "HTTP/1.1", CRLF) and the final CRLF.
_HEAD_SLACK = 1024
_LOGGED_TARGET = 256  # a refused target is logged truncated to this many bytes
# After a refusal the client may still be sending; closing with unread bytes makes the kernel
# send RST, which can destroy our answer before the client reads it. So, like nginx's
# lingering close: half-close, discard what still arrives, close at EOF or after this long.
_LINGER_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """The limits a connection checks, as plain numbers (built once from config)."""

    max_target: int
    max_headers: int
    max_header_bytes: int
    header_timeout: float

    @property
    def max_head_bytes(self) -> int:
        """Raw bytes an incomplete head may reach before it cannot be a legitimate one."""
        return self.max_target + self.max_header_bytes + _LINE_OVERHEAD * self.max_headers + _HEAD_SLACK

    @classmethod
    def from_config(cls, limits: Limits) -> HeadLimits:
        return cls(
            max_target=limits.max_request_line,
            max_headers=limits.max_headers,
            max_header_bytes=limits.max_header_bytes,
            header_timeout=float(limits.header_timeout),
        )


def render_error(kind: str, subject: str | None = None, retry_after: int | None = None) -> bytes:
    """The complete HTTP/1.1 error response for `kind`, as written when no ASGI cycle exists.

    Always `Connection: close`: the protocol closes the connection after writing it.
    """
    status, headers, body = error_head(kind, subject, retry_after)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers if name != b"connection"]
    lines.append(b"connection: close\r\n\r\n")
    return b"".join(lines) + body


@dataclass(frozen=True, slots=True)
class _Sink:
    """Holds the report callback (a plain class attribute would be bound as a method)."""

    report: Report


class _Refused(Exception):
    """Raised inside a parser callback to stop httptools; the kind is on the protocol."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus head limits and a head deadline (see module doc).

    Use `protocol_class()` to bind the limits and the report callback.
    """

    limits: ClassVar[HeadLimits]
    sink: ClassVar[_Sink]
    responses: ClassVar[dict[str, bytes]]
    # The limits the per-request path reads, as plain class attributes (one lookup each).
    _max_target: ClassVar[int]
    _max_headers: ClassVar[int]
    _max_header_bytes: ClassVar[int]
    # CONNECT requests are handed to these (tunnel.py); None: 501 unsupported (admin listener).
    tunnels: ClassVar[Tunnels | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_open = False  # a request head has begun and is not complete
        self._head_bytes = 0  # bytes of earlier reads while the head was open
        self._read_size = 0  # bytes of the read being parsed
        self._refusal: tuple[str, str] | None = None  # (kind, detail) set by a parser callback
        self._lingering = False
        self._connect = False  # the head just parsed is a CONNECT for self.tunnels

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms no timer before the first request: a silent connection would live forever.
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, ProxyCycle) and cycle.on_disconnect is not None:
            on_disconnect, cycle.on_disconnect = cycle.on_disconnect, None
            if not cycle.response_complete:
                on_disconnect()

    def data_received(self, data: bytes) -> None:
        # uvicorn's data_received, with our answers instead of its plain 400.
        if self._lingering:
            return  # refused: discard until the client closes (see _LINGER_SECONDS)
        self.stop_keepalive_timer()
        self._read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self._connect:
                self._hand_to_tunnel(data[exc.args[0] if exc.args else len(data):])
                return
            # ws="none": the app answers 501 unsupported; uvicorn only logs here.
            if self.upgrade_requested():
                self.handle_websocket_upgrade()
            else:
                self.warn_unsupported_upgrade()
            return
        except httptools.HttpParserError as exc:
            kind, detail = self._refusal or (parse_error_kind(str(exc)), f"unparsable request: {exc}")
            self._refuse(kind, detail)
            return
        if self._head_open:
            # A head spread over several reads: the only case that needs the byte guard and a timer.
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse("header_too_large", f"request head incomplete after {self._head_bytes} bytes")
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url  # httptools calls this once per read the target spans
        if len(self.url) > self._max_target:
            self._refusal = ("uri_too_long", f"request target longer than {self.limits.max_target} bytes")
            raise _Refused

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # Checked once per head rather than per header (uvicorn's on_header stays as it is):
        # the count is a len(); the header bytes are summed only when the head's reads
        # were big enough to hold that many. Until here the byte guard bounds what piles up.
        headers = self.headers
        if len(headers) > self._max_headers or (
            self._head_bytes + self._read_size > self._max_header_bytes
            and sum(len(name) + len(value) for name, value in headers) > self._max_header_bytes
        ):
            limits = self.limits
            size = sum(len(name) + len(value) for name, value in headers)
            detail = (f"{len(headers)} header fields, {size} bytes "
                      f"(limits {limits.max_headers} fields, {limits.max_header_bytes} bytes)")
            self._refusal = ("header_too_large", detail)
            raise _Refused
        try:
            # Here, before uvicorn builds the request's cycle and task: llhttp checks some
            # transfer codings only after this callback, when the app would already be on it.
            request_framing(headers, self.parser.get_http_version())
        except EgressError as exc:
            self._refusal = (exc.kind, exc.detail)
            raise _Refused from None
        url = self.url
        origin_form = url[:1] == b"/"  # the common case: one comparison, nothing else below
        if not origin_form and self.tunnels is not None and self.parser.get_method() == b"CONNECT":
            # No ASGI cycle: httptools raises HttpParserUpgrade once this callback returns,
            # and data_received hands the connection to the tunnel (tunnel.py).
            self._connect = True
            return
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and cycle is not None:
            adopt(cycle, ProxyCycle)  # uvicorn built its own cycle by name: make it ours
            if not origin_form and url[:4].lower() == b"http":
                # absolute-form (RFC 9112 3.2.2): uvicorn keeps only the path; routing reads the
                # destination from the URI's authority, as under h11, never from Host.
                self.scope["raw_path"] = url.partition(b"?")[0].partition(b"#")[0]

    def on_body(self, body: bytes) -> None:
        if not self._connect:  # a CONNECT has no cycle; httptools hands no body of it anyway
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._connect:
            super().on_message_complete()

    def _hand_to_tunnel(self, rest: bytes) -> None:
        """The CONNECT head is parsed: the connection is the tunnel's from here on."""
        self._connect = False
        self._cancel_head_timer()
        self.stop_keepalive_timer()
        self.connections.discard(self)  # uvicorn's shutdown no longer concerns it: drain does
        tunnels = self.tunnels
        assert tunnels is not None
        if self.cycle is not None and not self.cycle.response_complete:
            # A CONNECT pipelined behind a request still being answered: the tunnel's bytes
            # would interleave with that response.
            self._refuse("bad_request", "CONNECT pipelined behind an unfinished response")
            return
        tunnels.connect(self.transport, self.url, rest)

    # -- refusing --------------------------------------------------------------------------
    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_open:
            self._refuse("client_timeout", f"request head incomplete after {self.limits.header_timeout:g}s")
        elif self.cycle is None:
            # Nothing sent since the connection opened: close without an answer (module doc).
            self.transport.close()
            self.sink.report("client_timeout", "-", "-",
                        f"new connection sent nothing in {self.limits.header_timeout:g}s; closed without an answer")

    def _refuse(self, kind: str, detail: str) -> None:
        self._cancel_head_timer()
        self._head_open = False
        transport = self.transport
        if transport.is_closing():
            return
        if (self.cycle is None or self.cycle.response_complete) and transport.can_write_eof():
            transport.write(self.responses[kind])
            transport.write_eof()
            self._lingering = True
            self.loop.call_later(_LINGER_SECONDS, transport.close)
        elif self.cycle is None or self.cycle.response_complete:
            # TLS (an intercepted tunnel, intercept_tls.py) has no half-close: closing sends the
            # answer, then close_notify, and reads on until the client's (no RST).
            transport.write(self.responses[kind])
            transport.close()
        else:
            # An earlier pipelined request's response is still going out: an answer written now
            # would land inside it, so the connection is only closed (uvicorn's 400 does worse).
            transport.close()
        # The method precedes the target: once part of the target is in, the method is parsed.
        method = self.parser.get_method().decode("ascii", "replace") if self.url else "-"
        target = self.url[:_LOGGED_TARGET].decode("latin-1") if self.url else "-"
        self.sink.report(kind, method, target, detail)


_REFUSALS = ("uri_too_long", "header_too_large", "client_timeout", "bad_request", "unsupported")


def protocol_class(limits: Limits, report: Report, tunnels: Tunnels | None = None) -> type[LimitedHttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` bound to these limits and reporter,
    handing CONNECT requests to `tunnels` (None: they get 501 unsupported)."""
    head = HeadLimits.from_config(limits)
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "limits": head,
            "_max_target": head.max_target,
            "_max_headers": head.max_headers,
            "_max_header_bytes": head.max_header_bytes,
            "sink": _Sink(report),
            "tunnels": tunnels,
            "responses": {kind: render_error(kind) for kind in _REFUSALS},
        },
    )


def update_limits(protocol: type[LimitedHttpToolsProtocol], limits: Limits) -> None:
    """Apply reloaded head limits to a live protocol class (its connections read them per request)."""
    head = HeadLimits.from_config(limits)
    protocol.limits = head
    protocol._max_target = head.max_target
    protocol._max_headers = head.max_headers
    protocol._max_header_bytes = head.max_header_bytes


def observer_report(observer: Observer, route: str) -> Report:
    """Report refusals through the observer, so they get the log line and metric of any error."""

    def report(kind: str, method: str, target: str, detail: str) -> None:
        now = time.perf_counter()
        exchange = Exchange(start=now, method=method, path=target, route=route)
        exchange.kind, exchange.status, exchange.detail = kind, ERRORS[kind].status, detail
        observer.started(exchange)
        exchange.end = time.perf_counter()
        observer.finished(exchange)

    return report
