"""Classification that decides retries: HTTP/2 GOAWAY and RST_STREAM, resets mid-handshake."""

from __future__ import annotations

import ssl

import h2.errors
import h2.events
import h2.exceptions
import httpcore
import httpx
import pytest
from httpx._transports.default import map_httpcore_exceptions

from sidecar.errors import classify
from sidecar.resilience.retry import reason_for_kind


def _through_httpx(event: object) -> httpx.HTTPError:
    """Raise the event the way httpcore does, mapped the way httpx's transport maps it."""
    try:
        with map_httpcore_exceptions():
            raise httpcore.RemoteProtocolError(event)
    except httpx.HTTPError as exc:
        return exc
    raise AssertionError("not raised")


def test_goaway_is_an_upstream_reset() -> None:
    event = h2.events.ConnectionTerminated()
    event.error_code = h2.errors.ErrorCodes.NO_ERROR
    event.last_stream_id = 0
    exc = _through_httpx(event)
    assert isinstance(exc, httpx.RemoteProtocolError)
    assert classify(exc) == "upstream_reset"
    assert reason_for_kind(classify(exc)) == "reset"


@pytest.mark.parametrize("code", [h2.errors.ErrorCodes.REFUSED_STREAM, h2.errors.ErrorCodes.CANCEL])
def test_stream_reset_is_an_upstream_reset(code: h2.errors.ErrorCodes) -> None:
    event = h2.events.StreamReset(stream_id=3, error_code=code)
    assert classify(_through_httpx(event)) == "upstream_reset"


def test_other_protocol_errors_stay_protocol_errors() -> None:
    assert classify(_through_httpx("illegal status line")) == "protocol_error"


@pytest.mark.parametrize("state_input", ["RECV_HEADERS", "RECV_DATA", "SEND_HEADERS"])
def test_h2_refusing_frames_after_goaway_is_an_upstream_reset(state_input: str) -> None:
    # h2 closes its state machine on GOAWAY; frames for streams the server still answers, or a new
    # request on that connection, then fail inside h2 (encode/httpcore#46, #679).
    error = h2.exceptions.ProtocolError(f"Invalid input ConnectionInputs.{state_input} in state ConnectionState.CLOSED")
    try:
        with map_httpcore_exceptions():
            raise httpcore.LocalProtocolError(error)
    except httpx.LocalProtocolError as exc:
        assert classify(exc) == "upstream_reset"


def test_reset_during_tls_handshake_is_a_connect_error_not_tls() -> None:
    # asyncio's SSL transport raises the reset with SSLWantReadError as its __context__.
    reset = ConnectionResetError(104, "Connection reset by peer")
    reset.__context__ = ssl.SSLWantReadError(2, "The operation did not complete (read)")
    try:
        with map_httpcore_exceptions():
            raise httpcore.ConnectError("") from reset
    except httpx.ConnectError as exc:
        assert classify(exc) == "connect_error"
        assert reason_for_kind(classify(exc)) == "connect"
