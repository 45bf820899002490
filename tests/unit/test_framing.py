"""Request framing rules (sidecar/ingress/framing.py), and the h11 listener's connection, which is
sans-IO: fed bytes here, no sockets. Plus contract checks on the llhttp messages and the
uvicorn seams those modules rely on."""

from __future__ import annotations

import inspect

import h11
import httptools
import pytest

from sidecar._compat.h11 import H11Protocol, buffered
from sidecar.config import Limits
from sidecar.errors import EgressError
from sidecar.ingress.framing import head_problem, parse_error_kind, request_framing
from sidecar.ingress.h11_protocol import StrictH11Connection
from sidecar.ingress.protocol import HeadLimits

CL, TE = b"content-length", b"transfer-encoding"
_LIMITS = HeadLimits.from_config(Limits())


@pytest.mark.parametrize(
    ("headers", "version", "expected"),
    [
        ([], "1.1", (False, False, None)),
        ([(CL, b"0")], "1.1", (False, False, b"0")),
        ([(CL, b"5")], "1.1", (True, False, b"5")),
        ([(CL, b"0005")], "1.1", (True, False, b"5")),  # forwarded as 5: never read as octal
        ([(CL, b"000")], "1.1", (False, False, b"0")),
        ([(CL, b"5"), (CL, b"05")], "1.1", (True, False, b"5")),  # the same number twice
        ([(TE, b"chunked")], "1.1", (True, True, None)),
        ([(TE, b"CHUNKED")], "1.1", (True, True, None)),  # codings are case-insensitive
        ([(TE, b"chunked \t")], "1.1", (True, True, None)),
        ([(b"transfer_encoding", b"chunked"), (CL, b"2")], "1.1", (True, False, b"2")),  # a look-alike
    ],
)
def test_accepted_framing(headers: list[tuple[bytes, bytes]], version: str, expected: object) -> None:
    assert request_framing(headers, version) == expected


@pytest.mark.parametrize(
    ("headers", "version", "kind"),
    [
        ([(CL, b"5"), (TE, b"chunked")], "1.1", "bad_request"),
        ([(TE, b"chunked"), (CL, b"5")], "1.1", "bad_request"),
        ([(CL, b"5"), (TE, b"gzip, chunked")], "1.1", "bad_request"),  # the pair first, whatever the coding
        ([(CL, b"+5")], "1.1", "bad_request"),
        ([(CL, b"-1")], "1.1", "bad_request"),
        ([(CL, b"5 ")], "1.1", "bad_request"),
        ([(CL, b"0x5")], "1.1", "bad_request"),
        ([(CL, b"5, 5")], "1.1", "bad_request"),
        ([(CL, b"")], "1.1", "bad_request"),
        ([(CL, "５".encode())], "1.1", "bad_request"),  # a non-ASCII digit
        ([(CL, b"5"), (CL, b"6")], "1.1", "bad_request"),
        ([(TE, b"chunked")], "1.0", "bad_request"),  # RFC 9112 6.1
        ([(TE, b"xchunked")], "1.1", "unsupported"),
        ([(TE, b"gzip, chunked")], "1.1", "unsupported"),
        ([(TE, b"chunked, identity")], "1.1", "unsupported"),
        ([(TE, b"identity")], "1.1", "unsupported"),
        ([(TE, b'"chunked"')], "1.1", "unsupported"),
        ([(TE, b"chunked"), (TE, b"chunked")], "1.1", "unsupported"),
        ([(TE, b"chunked, chunked")], "1.1", "unsupported"),
    ],
)
def test_refused_framing(headers: list[tuple[bytes, bytes]], version: str, kind: str) -> None:
    with pytest.raises(EgressError) as refused:
        request_framing(headers, version)
    assert refused.value.kind == kind


@pytest.mark.parametrize(
    ("buffered", "problem"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith\rbare\n line ends", None),  # only the head counts
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\n", None),  # not complete yet
        (b"GET / HTTP/1.1\nHost: a\n\n", "bare"),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "bare"),
        (b"GET / HTTP/1.1\r\nX\r-A: 1\r\n\r\n", "bare"),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\nX-A: 1\r\n\tfolded\r\n\r\n", "folding"),
        (b"GET / HTTP/1.1\r\n Transfer-Encoding: chunked\r\n\r\n", "folding"),
    ],
)
def test_head_problem(buffered: bytes, problem: str | None) -> None:
    found = head_problem(buffered)
    assert (found is None) if problem is None else (found is not None and problem in found)


class _Sink:
    def on_headers_complete(self) -> None:
        pass


@pytest.mark.parametrize(
    ("framing", "kind"),
    [
        (b"Transfer-Encoding: chunked, identity", "unsupported"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", "unsupported"),
        (b"Transfer-Encoding: xchunked", "unsupported"),  # llhttp's after-head message
        (b"Content-Length: 5\r\nTransfer-Encoding: chunked", "bad_request"),
        (b"Content-Length: 1\r\nContent-Length: 2", "bad_request"),
        (b"Transfer-Encoding : chunked", "bad_request"),
    ],
)
def test_llhttp_messages_map_to_our_kinds(framing: bytes, kind: str) -> None:
    """Contract: the llhttp messages parse_error_kind reads. An httptools upgrade that words
    them differently fails here (re-read llhttp's src/native/http.c and framing.py)."""
    parser = httptools.HttpRequestParser(_Sink())
    with pytest.raises(httptools.HttpParserError) as failed:
        parser.feed_data(b"POST / HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n\r\n0\r\n\r\n")
    assert parse_error_kind(str(failed.value)) == kind


def _h11_refusal(data: bytes) -> tuple[str, str] | None:
    """Feed a strict h11 connection; (kind, detail) of its refusal, None if it took the request."""
    conn = StrictH11Connection(_LIMITS)
    conn.receive_data(data)
    try:
        while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
            pass
    except h11.RemoteProtocolError:
        assert conn.refusal is not None
        return conn.refusal[0], conn.refusal[3]
    return None


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_request"),
        (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", "bad_request"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported"),
        (b"GET / HTTP/1.1\nHost: a\n\n", "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n", "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", "bad_request"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", "uri_too_long"),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"x-%d: v\r\n" % i for i in range(200)) + b"\r\n",
         "header_too_large"),
    ],
)
def test_strict_h11_connection_refuses_what_llhttp_refuses(data: bytes, kind: str) -> None:
    refusal = _h11_refusal(data)
    assert refusal is not None and refusal[0] == kind


def test_strict_h11_connection_takes_plain_requests_and_checks_pipelined_heads() -> None:
    assert _h11_refusal(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello") is None
    assert _h11_refusal(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") is None
    # A second head that came in the same read as the first is checked when its turn comes.
    conn = StrictH11Connection(_LIMITS)
    conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\nHost: a\n\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    with pytest.raises(h11.RemoteProtocolError):
        conn.next_event()
    assert conn.refusal is not None and "bare" in conn.refusal[3]


def test_uvicorn_h11_seams_are_where_h11_protocol_expects_them() -> None:
    """Contract: h11_protocol.py replaces `self.conn` after uvicorn's __init__ and relies on
    handle_events answering a RemoteProtocolError from next_event() through
    send_400_response. If an upgrade moves either, re-read uvicorn's h11_impl.py."""
    source = inspect.getsource(H11Protocol.handle_events)
    assert "self.conn.next_event()" in source
    assert "except h11.RemoteProtocolError" in source
    assert "self.send_400_response(" in source
    assert "self.conn = h11.Connection(" in inspect.getsource(H11Protocol.__init__)


def test_h11_keeps_unparsed_bytes_where_the_head_check_reads_them() -> None:
    conn = StrictH11Connection(_LIMITS)
    conn.receive_data(b"GET / HTTP/1.1\r\n")
    assert isinstance(buffered(conn), bytearray)
    assert bytes(buffered(conn)) == conn.trailing_data[0]
