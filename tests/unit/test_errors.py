"""The one mapping from exceptions to error kinds, and the error response shape. Pure."""

from __future__ import annotations

import asyncio
import socket
import ssl

import httpx
import pytest

from sidecar import config as cfg
from sidecar.errors import ERRORS, EgressError, NameNotResolved, classify, error_head, error_subject
from sidecar.forward import ForwardApp
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
