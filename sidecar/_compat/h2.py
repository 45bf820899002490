"""Telling h2's errors apart, as they reach us wrapped in httpcore's and httpx's exceptions.

Touches (h2 4.x, httpcore 1.0; re-read `h2/events.py`, `h2/exceptions.py`,
`h2/connection.py` `H2ConnectionStateMachine.process_input`, and
`httpcore/_async/http2.py` where it raises `RemoteProtocolError(event)`):
- the class names `ConnectionTerminated` and `StreamReset` of `h2.events` (httpcore puts the
  event itself in its exception's args), and `ProtocolError` of `h2.exceptions`;
- the text of h2's closed-state error, "Invalid input ConnectionInputs.RECV_HEADERS in state
  ConnectionState.CLOSED": matched on `ConnectionState.CLOSED`.

Matched by module and class name, never by importing h2: this runs in `errors.classify` on
every error, and h2 is loaded only with an HTTP/2 pool.

How httpcore reports an HTTP/2 upstream dropping a stream before its response head; all three
are a reset before headers, not a malformed response (RFC 9113 sections 6.8 and 8.7):
- the h2 events GOAWAY (ConnectionTerminated, e.g. nginx's keepalive_requests) and RST_STREAM
  (StreamReset, e.g. REFUSED_STREAM), wrapped in RemoteProtocolError;
- h2's own ProtocolError "Invalid input ConnectionInputs.RECV_HEADERS in state
  ConnectionState.CLOSED", wrapped in LocalProtocolError: h2 closes its state machine on GOAWAY
  and rejects the response frames the server may still send for streams up to last_stream_id
  (nginx sends GOAWAY before the last response; encode/httpcore#46), or a request was started
  on a connection h2 already saw closed (encode/httpcore#679).
"""

from __future__ import annotations

RESET_EVENTS = frozenset({"ConnectionTerminated", "StreamReset"})
CLOSED_STATE_TEXT = "ConnectionState.CLOSED"


def is_connection_end(exc: BaseException) -> bool:
    """True if `exc` (or a cause up to 3 levels down) carries h2's sign of a dropped stream."""
    current: BaseException | None = exc
    for _ in range(4):  # httpx's exception, then httpcore's as its __cause__
        if current is None:
            return False
        for arg in current.args:
            kind = type(arg)
            if not kind.__module__.startswith("h2."):
                continue
            if kind.__name__ in RESET_EVENTS:
                return True
            if kind.__name__ == "ProtocolError" and CLOSED_STATE_TEXT in str(arg):
                return True
        current = current.__cause__
    return False
