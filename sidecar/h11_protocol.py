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

What h11 does not have here that the httptools listener does: the 414 for a long target and
the head deadline (limits.py); h11's `max_incomplete_event_size` bounds the head in bytes.

Imported only when `listen.http` is h11: the run path does not load h11 otherwise.
Contract (tests/unit/test_framing.py fails if it moves): uvicorn's `H11Protocol.__init__`
builds `self.conn`, its `handle_events` catches `h11.RemoteProtocolError` from
`conn.next_event()` and calls `send_400_response(msg)`; h11 0.16 keeps unparsed bytes in
`Connection._receive_buffer._data`, a bytearray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.errors import EgressError
from sidecar.framing import head_problem, request_framing
from sidecar.limits import _LINGER_SECONDS, Report, render_error

# h11's status hint of a parse error -> our error kind.
_KINDS = {400: "bad_request", 431: "header_too_large", 501: "unsupported"}
_REFUSALS = ("bad_request", "header_too_large", "unsupported")
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
            problem = head_problem(self._receive_buffer._data)
            if problem is not None:
                self._refuse("bad_request", "-", "-", problem)
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if self.refusal is None:
                kind = _KINDS.get(exc.error_status_hint, "bad_request")
                self.refusal = (kind, "-", "-", f"unparsable request: {exc}")
            raise
        if type(event) is h11.Request:
            try:
                request_framing(event.headers, event.http_version.decode("ascii"))
            except EgressError as exc:
                target = event.target[:_LOGGED_TARGET].decode("latin-1")
                self._refuse(exc.kind, event.method.decode("ascii", "replace"), target, exc.detail)
        return event

    def _refuse(self, kind: str, method: str, target: str, detail: str) -> None:
        self.refusal = (kind, method, target, detail)
        raise h11.RemoteProtocolError(detail, error_status_hint=400)


class StrictH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the strict connection and our refusals (module doc).

    Use `protocol_class()` to bind the report callback.
    """

    report: ClassVar[tuple[Report]]  # in a tuple: a plain function would be bound as a method
    responses: ClassVar[dict[str, bytes]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size  # server.py always sets it
        self._strict = StrictH11Connection(h11.SERVER) if size is None else StrictH11Connection(h11.SERVER, size)
        self.conn = self._strict
        self._lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: discard until the client closes (limits._LINGER_SECONDS)
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        kind, method, target, detail = self._strict.refusal or ("bad_request", "-", "-", msg)
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


def protocol_class(report: Report) -> type[StrictH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` bound to this reporter (h11 gets its
    head bound as `h11_max_incomplete_event_size`, server.py)."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropParseWarning) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_DropParseWarning())
    return type(
        "StrictH11Protocol",
        (StrictH11Protocol,),
        {"report": (report,), "responses": {kind: render_error(kind) for kind in _REFUSALS}},
    )
