"""Head limits as plain data, and the raw error responses the protocol writes itself. Pure."""

from __future__ import annotations

import pytest

from sidecar import config as cfg
from sidecar.ingress.protocol import HeadLimits, render_error


@pytest.mark.parametrize(
    ("kind", "status"),
    [("uri_too_long", 414), ("header_too_large", 431), ("client_timeout", 408), ("bad_request", 400)],
)
def test_refusal_is_a_complete_response_that_closes(kind: str, status: int) -> None:
    raw = render_error(kind)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()) and head.count(b"\r\n") >= 4
    lines = head.split(b"\r\n")[1:]
    headers = [tuple(line.split(b": ", 1)) for line in lines]
    assert (b"x-egress-error", kind.encode()) in headers
    assert (b"connection", b"close") in headers and [h for h in headers if h[0] == b"connection"] == [
        (b"connection", b"close")]
    assert (b"content-length", str(len(body)).encode()) in headers
    assert body.startswith(f"egress-sidecar: {kind}: ".encode()) and body.count(b"\n") == 1 and body.endswith(b"\n")


def test_head_limits_come_from_config_and_bound_an_incomplete_head() -> None:
    limits = HeadLimits.from_config(cfg.Limits(max_request_line=100, max_header_bytes=1000, max_headers=10,
                                               header_timeout=cfg.Seconds(2)))
    assert (limits.max_target, limits.max_header_bytes, limits.max_headers, limits.header_timeout) == (100, 1000, 10, 2.0)
    # The largest legitimate head: the target, the header bytes, ": " and CRLF per header, a request line.
    largest_legit = 100 + 1000 + 4 * 10 + len(b"OPTIONS  HTTP/1.1\r\n\r\n")
    assert largest_legit < limits.max_head_bytes <= largest_legit + 1024


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"limits": {"max_headers": 0}}, "$.limits.max_headers"),
        ({"limits": {"max_request_line": 0}}, "$.limits.max_request_line"),
        ({"limits": {"header_timeout": "0s"}}, "$.limits.header_timeout"),
        ({"limits": {"body_idle_timeout": 0}}, "$.limits.body_idle_timeout"),
    ],
)
def test_limits_that_would_refuse_everything_are_config_errors(raw: dict, key: str) -> None:
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_mapping(raw)
    assert key in str(error.value)
