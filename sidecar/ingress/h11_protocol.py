"""The data listener on h11 (`listen.http: h11`): uvicorn's h11 protocol, as strict as llhttp.

uvicorn's `H11Protocol` answers every h11 parse error with a plain 400 of its own (no
`x-egress-error`, no log line, no metric), and h11 is more lenient than llhttp where it
matters for request smuggling: it takes a request with both Content-Length and
Transfer-Encoding by the latter, takes a bare LF as a line end, and unfolds obs-fold. With
such a request answered by the app and the connection kept open, the bytes after the
chunked terminator, which the client framed as body, were read as the next request.

Here, through two seams uvicorn and h11 offer:
- `StrictH11Connection` (an `h11.Connection`) checks each request head before h11 parses
  it (framing.head_problem) and each parsed request's framing (framing.request_framing);
  a refusal is raised as the `h11.RemoteProtocolError` uvicorn already catches;
- `StrictH11Protocol.send_400_response`, which uvicorn calls for every such error, answers
  in our format (errors.py) with the kind the error calls for (h11's status hint: 400, 431,
  501), reports it like limits.py does (log line, metric), and closes the connection the
  same lingering way, so nothing after a refused request is ever read as a request.

The head limits are the httptools listener's too (limits.py), from the same `limits:` keys:
a target longer than `max_request_line` gets 414, more than `max_headers` fields or
`max_header_bytes` of them 431 (h11's `max_incomplete_event_size` bounds an incomplete head
in bytes, server.py), a head not complete `header_timeout` after its first bytes (or after
the connection opened) 408, and a new connection that sends nothing is closed unanswered.

Imported only when `listen.http` is h11: the run path does not load h11 otherwise.
What this relies on of uvicorn's `H11Protocol` and of h11's buffer lives in
sidecar/_compat/h11.py (tests/unit/test_framing.py fails if it moves).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import h11

from sidecar._compat.h11 import H11Protocol, buffered
from sidecar.config import Limits
from sidecar.errors import EgressError
from sidecar.ingress.framing import head_problem, request_framing
from sidecar.ingress.protocol import _LINGER_SECONDS, HeadLimits, Report, render_error

# h11's status hint of a parse error -> our error kind.
_KINDS = {400: "bad_request", 431: "header_too_large", 501: "unsupported"}
_REFUSALS = ("bad_request", "header_too_large", "unsupported", "uri_too_long", "client_timeout")
_LOGGED_TARGET = 256
# What uvicorn's handle_events logs before calling send_400_response: our report says it
# better (kind, method, target, detail), once.
_UVICORN_PARSE_WARNING = "Invalid HTTP request received."


class _DropParseWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _UVICORN_PARSE_WARNING


class StrictH11Connection(h11.Connection):
    """An h11 server connection that refuses what llhttp refuses (module doc).

    `refusal` holds (kind, method, target, detail) of the last error raised, for the protocol.
    """

    refusal: tuple[str, str, str, str] | None = None
    # Whether bytes with a line break came since the head check: a head can only become
    # complete with one, so a client trickling a head is not re-checked on every read.
    _unchecked = True

    def __init__(self, limits: HeadLimits, max_incomplete_event_size: int | None = None) -> None:
        if max_incomplete_event_size is None:
            super().__init__(h11.SERVER)
        else:
            super().__init__(h11.SERVER, max_incomplete_event_size)
        self.limits = limits

    def receive_data(self, data: bytes) -> None:
        super().receive_data(data)
        if b"\n" in data:
            self._unchecked = True

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self._unchecked = True  # a pipelined head may already be buffered

    def next_event(self) -> Any:
        if self._unchecked and self.their_state is h11.IDLE:
            self._unchecked = False
            # h11's own buffer, not a copy (`trailing_data` copies it all): a read full of
            # tiny pipelined requests would be copied once per request.
            problem = head_problem(buffered(self))
            if problem is not None:
                self._refuse("bad_request", "-", "-", problem)
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if self.refusal is None:
                kind = _KINDS.get(exc.error_status_hint, "bad_request")
                detail = (f"request head incomplete after {len(buffered(self))} bytes"
                          if kind == "header_too_large" else f"unparsable request: {exc}")
                self.refusal = (kind, "-", "-", detail)
            raise
        if type(event) is h11.Request:
            self._check(event)
        return event

    def _check(self, request: h11.Request) -> None:
        """limits.py's head limits, then the framing rules, on a parsed request head."""
        limits = self.limits
        target = request.target
        method = request.method.decode("ascii", "replace")
        logged = target[:_LOGGED_TARGET].decode("latin-1")
        if len(target) > limits.max_target:
            self._refuse("uri_too_long", method, logged, f"request target longer than {limits.max_target} bytes")
        headers = request.headers
        size = sum(len(name) + len(value) for name, value in headers)
        if len(headers) > limits.max_headers or size > limits.max_header_bytes:
            self._refuse("header_too_large", method, logged,
                         f"{len(headers)} header fields, {size} bytes "
                         f"(limits {limits.max_headers} fields, {limits.max_header_bytes} bytes)")
        try:
            request_framing(headers, request.http_version.decode("ascii"))
        except EgressError as exc:
            self._refuse(exc.kind, method, logged, exc.detail)

    def _refuse(self, kind: str, method: str, target: str, detail: str) -> None:
        self.refusal = (kind, method, target, detail)
        raise h11.RemoteProtocolError(detail, error_status_hint=400)


class StrictH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the strict connection and our refusals (module doc).

    Use `protocol_class()` to bind the report callback.
    """

    report: ClassVar[tuple[Report]]  # in a tuple: a plain function would be bound as a method
    responses: ClassVar[dict[str, bytes]]
    limits: ClassVar[HeadLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._strict = StrictH11Connection(self.limits, self.config.h11_max_incomplete_event_size)
        self.conn = self._strict
        self._lingering = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # As limits.py: uvicorn arms no timer before the first request.
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: discard until the client closes (limits._LINGER_SECONDS)
        idle = self._strict.their_state is h11.IDLE
        if idle and self._head_timer is None:
            # The first bytes of a new head: it has header_timeout to be complete (uvicorn's
            # data_received cancels its keep-alive timer on any byte, so nothing else would).
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)
        super().data_received(data)
        if self._head_timer is not None and self._strict.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is complete

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._strict.their_state is not h11.IDLE:
            return
        if buffered(self._strict):
            self._answer("client_timeout", "-", "-",
                         f"request head incomplete after {self.limits.header_timeout:g}s")
        elif self.cycle is None:
            # Nothing sent since the connection opened: closed without an answer (limits.py).
            self.transport.close()
            self.report[0]("client_timeout", "-", "-",
                           f"new connection sent nothing in {self.limits.header_timeout:g}s; "
                           "closed without an answer")

    def send_400_response(self, msg: str) -> None:
        self._answer(*(self._strict.refusal or ("bad_request", "-", "-", msg)))

    def _answer(self, kind: str, method: str, target: str, detail: str) -> None:
        """Answer a refusal in our format, then close (lingering), and report it."""
        self._cancel_head_timer()
        transport: asyncio.Transport = self.transport
        if transport.is_closing():
            return
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and transport.can_write_eof():
            transport.write(self.responses[kind])
            transport.write_eof()
            self._lingering = True
            self.loop.call_later(_LINGER_SECONDS, transport.close)
        else:
            # A response is under way on this connection: an answer now would land inside it.
            transport.close()
        self.report[0](kind, method, target, detail)


def protocol_class(limits: Limits, report: Report) -> type[StrictH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` bound to these limits and reporter
    (h11 gets its byte bound on an incomplete head as `h11_max_incomplete_event_size`)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropParseWarning) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_DropParseWarning())
    return type(
        "StrictH11Protocol",
        (StrictH11Protocol,),
        {"report": (report,), "responses": {kind: render_error(kind) for kind in _REFUSALS},
         "limits": HeadLimits.from_config(limits)},
    )
