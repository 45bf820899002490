"""Errors the sidecar produces before any byte goes upstream: status, header, body, log line."""

from __future__ import annotations

import pytest

from tests.conftest import Sidecar
from tests.e2e.test_transparency import raw_request, split_response


def assert_error(sidecar: Sidecar, raw: bytes, status: int, kind: str) -> None:
    got_status, headers, body = split_response(raw)
    assert got_status == status, body
    assert dict(headers)["x-egress-error"] == kind
    assert body.count(b"\n") == 1 and body.startswith(f"egress-sidecar: {kind}:".encode())
    sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == kind)


@pytest.mark.parametrize(
    ("request_bytes", "status", "kind"),
    [
        (b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 404, "no_route"),
        (b"GET /x HTTP/1.1\r\nHost: bad..host^\r\nConnection: close\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nHost: user@example.com\r\nConnection: close\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nConnection: close\r\n\r\n", 508, "loop"),
        ((b"GET /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"), 501, "unsupported"),
    ],
    ids=["no_route", "bad_host", "userinfo", "loop_admin", "websocket"],
)
def test_refused_requests_get_a_clear_error(sidecar: Sidecar, request_bytes: bytes, status: int, kind: str) -> None:
    payload = request_bytes.replace(b"{port}", str(sidecar.port).encode()).replace(
        b"{admin}", str(sidecar.admin_port).encode())
    assert_error(sidecar, raw_request(sidecar.port, payload), status, kind)


def test_forward_proxy_to_own_data_port_is_a_loop(sidecar: Sidecar) -> None:
    raw = raw_request(sidecar.port, f"GET http://127.0.0.1:{sidecar.port}/x HTTP/1.1\r\nHost: 127.0.0.1:"
                                    f"{sidecar.admin_port}\r\nConnection: close\r\n\r\n".encode())
    assert_error(sidecar, raw, 508, "loop")


def test_connect_refused_is_a_502(sidecar: Sidecar) -> None:
    import socket

    with socket.socket() as sock:  # a port that is certainly closed: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        raw = raw_request(sidecar.port, f"GET /x HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
                          .encode())
    assert_error(sidecar, raw, 502, "connect_error")
