"""The one mapping from exceptions to error kinds, and the error response shape. Pure."""

from __future__ import annotations

import asyncio
import socket
import ssl

import httpx
import pytest

from sidecar import config as cfg
from sidecar.errors import ERRORS, EgressError, NameNotResolved, classify, error_head, error_subject
from sidecar.proxy.app import ForwardApp
from sidecar.runtime import build_runtime


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.PoolTimeout("x"), "pool_timeout"),
        (httpx.ConnectTimeout("x"), "connect_timeout"),
        (httpx.ReadTimeout("x"), "read_timeout"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connect_error"),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "tls_error"),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), "upstream_reset"),
        (httpx.RemoteProtocolError("illegal status line: bytearray(b'NOT HTTP')"), "protocol_error"),
        (httpx.ReadError("reset"), "upstream_reset"),
        (ssl.SSLError(1, "wrong version"), "tls_error"),
        (EgressError("denied_host", "x"), "denied_host"),
        (RuntimeError("bug"), "internal"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_tls_cause_is_found_through_the_chain() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "bad cert")
        except ssl.SSLError as inner:
            raise httpx.ConnectError("handshake failed") from inner
    except httpx.ConnectError as outer:
        assert classify(outer) == "tls_error"


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_every_kind_has_a_deliberate_status_and_one_line_body(kind: str) -> None:
    status, headers, body = error_head(kind, "api.example.com")
    assert 400 <= status < 600
    assert dict(headers)[b"x-egress-error"] == kind.encode()
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and b"api.example.com" in body
    if status == 503:
        assert b"retry-after" in dict(headers)


def test_draining_sidecar_answers_503_draining() -> None:
    """Once the drain has ended, a request that still reaches the app is refused, not forwarded."""

    async def scenario() -> list[dict]:
        runtime = build_runtime(cfg.Config())
        runtime.stopping = True
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x", "query_string": b"",
                 "headers": [(b"host", b"api.example.com")]}
        await ForwardApp(runtime)(scope, receive, send)
        await runtime.upstream.aclose()
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 503
    assert (b"x-egress-error", b"draining") in sent[0]["headers"]


def test_a_name_that_did_not_resolve_is_a_connect_error_whose_body_says_so() -> None:
    resolver = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    cause = NameNotResolved("api.example.com", resolver)
    try:
        try:
            raise cause
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve api.example.com: {exc}") from exc
    except httpx.ConnectError as wrapped:
        assert classify(wrapped) == "connect_error"
        assert error_subject(wrapped) == "api.example.com does not resolve: Name or service not known"
    assert error_subject(httpx.ConnectError("refused")) is None
    assert error_subject(EgressError("no_route", subject="x")) == "x"


def test_the_resolver_error_is_found_through_a_re_raise_from_none_but_not_an_implicit_context() -> None:
    unresolved = NameNotResolved("gone.test", socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    try:
        try:
            try:
                raise unresolved
            except OSError as exc:
                raise httpx.ConnectError("cannot resolve gone.test") from exc
        except httpx.ConnectError as exc:
            raise exc from None  # what httpcore's pool does
    except httpx.ConnectError as reraised:
        assert error_subject(reraised) == "gone.test does not resolve: Name or service not known"
    try:
        try:
            raise unresolved
        except OSError:
            raise httpx.ConnectError("127.0.0.1:1: connection refused")  # noqa: B904 - the case under test
    except httpx.ConnectError as later:
        assert error_subject(later) is None


# Every row of the error table as DESIGN.md specifies it: (status, Retry-After, close).
ERROR_TABLE = {
    "bad_request": (400, None, True),
    "no_route": (404, None, False),
    "loop": (508, None, False),
    "denied_host": (403, None, False),
    "denied_ip": (403, None, False),
    "denied_port": (403, None, False),
    "header_too_large": (431, None, True),
    "uri_too_long": (414, None, True),
    "connect_error": (502, None, False),
    "tls_error": (502, None, False),
    "protocol_error": (502, None, False),
    "upstream_reset": (502, None, False),
    "connect_timeout": (504, None, False),
    "read_timeout": (504, None, False),
    "write_timeout": (504, None, False),
    "pool_timeout": (503, 1, False),
    "overloaded": (503, 1, False),
    "circuit_open": (503, 5, False),
    "draining": (503, 1, True),
    "unsupported": (501, None, True),
    "client_timeout": (408, None, True),
    "internal": (500, None, False),
}


def test_the_error_table_has_exactly_the_specified_kinds() -> None:
    assert set(ERRORS) >= set(ERROR_TABLE)
    assert set(ERRORS) - set(ERROR_TABLE) == set(), "a new kind needs its row here and in DESIGN.md"


@pytest.mark.parametrize(("kind", "row"), sorted(ERROR_TABLE.items()))
def test_each_error_kind_answers_its_status_retry_after_and_close(kind: str, row: tuple[int, int | None, bool]) -> None:
    status, retry_after, close = row
    answered, headers, body = error_head(kind)
    fields = dict(headers)
    assert answered == status
    assert fields.get(b"retry-after") == (str(retry_after).encode() if retry_after is not None else None)
    assert fields.get(b"connection") == (b"close" if close else None)
    assert fields[b"content-length"] == str(len(body)).encode()
    assert fields[b"content-type"] == b"text/plain; charset=utf-8"
    assert body == f"egress-sidecar: {kind}: {ERRORS[kind].message}\n".encode()


def test_a_producer_may_override_retry_after_and_name_a_subject() -> None:
    status, headers, body = error_head("circuit_open", "api.example.com:443", retry_after=3)
    assert (status, dict(headers)[b"retry-after"]) == (503, b"3")
    assert body.endswith(b" (api.example.com:443)\n")
    error = EgressError("circuit_open", "upstream x", subject="x", retry_after=3)
    assert (error.kind, error.detail, error.subject, error.retry_after, str(error)) == (
        "circuit_open", "upstream x", "x", 3, "circuit_open: upstream x")
    assert str(EgressError("loop")) == "loop"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.WriteTimeout("x"), "write_timeout"),
        (httpx.WriteError("broken pipe"), "upstream_reset"),
        (ConnectionResetError("reset"), "upstream_reset"),
        (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), "protocol_error"),
        (httpx.RemoteProtocolError("connection closed while reading"), "upstream_reset"),
        (httpx.LocalProtocolError("illegal header"), "protocol_error"),
        (httpx.UnsupportedProtocol("ftp"), "bad_request"),
        (OSError("no route"), "connect_error"),
        (httpx.ReadError("[SSL: ALERT] during the SSL handshake"), "tls_error"),
        (httpx.ConnectError("SSL handshake failed"), "tls_error"),
    ],
)
def test_classify_the_rest(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_a_want_read_in_the_chain_is_a_reset_not_tls() -> None:
    try:
        try:
            raise ssl.SSLWantReadError("The operation did not complete")
        except ssl.SSLError as inner:
            raise httpx.ReadError("reset") from inner
    except httpx.ReadError as outer:
        assert classify(outer) == "upstream_reset"


@pytest.mark.parametrize(("exc", "kind"), [
    (httpx.ConnectError("connection reset during handshake"), "connect_error"),  # no SSL: not TLS
    (httpx.ReadError("[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed"), "upstream_reset"),
])
def test_only_a_handshake_failure_reads_as_tls_by_its_text(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


def test_a_tls_error_found_through_an_implicit_context() -> None:
    try:
        try:
            raise ssl.SSLError(1, "alert")
        except ssl.SSLError:
            raise httpx.ReadError("reset")  # noqa: B904 - the implicit __context__ is what is tested
    except httpx.ReadError as outer:
        assert outer.__cause__ is None
        assert classify(outer) == "tls_error"


def test_a_cause_cycle_ends_the_search() -> None:
    first, second = httpx.ReadError("a"), ConnectionResetError("b")
    first.__cause__, second.__cause__ = second, first
    assert classify(first) == "upstream_reset"


def test_a_subject_outside_ascii_is_replaced_in_the_body() -> None:
    _, headers, body = error_head("denied_host", "bücher.example")
    assert body == b"egress-sidecar: denied_host: egress to this host is denied by policy (b?cher.example)\n"
    assert dict(headers)[b"content-length"] == str(len(body)).encode()
