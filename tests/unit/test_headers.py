"""Header rules in both directions. Pure."""

from __future__ import annotations

from sidecar.headers import (
    body_framing,
    connection_tokens,
    downstream_response_headers,
    is_upgrade,
    upstream_request_headers,
)


def test_upstream_headers_keep_order_and_repeats_and_set_host() -> None:
    headers = [(b"host", b"sidecar"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]
    assert upstream_request_headers(headers, b"api.example.com") == [
        (b"host", b"api.example.com"), (b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]


def test_hop_by_hop_and_connection_listed_names_are_dropped() -> None:
    headers = [
        (b"connection", b"keep-alive, X-Private"), (b"x-private", b"1"), (b"keep-alive", b"300"),
        (b"transfer-encoding", b"chunked"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic eA=="), (b"x-kept", b"yes"),
    ]
    out = upstream_request_headers(headers, b"h")
    assert out == [(b"host", b"h"), (b"x-kept", b"yes")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-private"}


def test_injected_headers_replace_the_apps() -> None:
    headers = [(b"authorization", b"Bearer app"), (b"x-a", b"1")]
    out = upstream_request_headers(headers, b"h", [(b"authorization", lambda: b"Bearer route")])
    assert out == [(b"host", b"h"), (b"x-a", b"1"), (b"authorization", b"Bearer route")]


def test_optional_forwarding_headers() -> None:
    out = upstream_request_headers([], b"h", chunked=True, via=True, forwarded_for=b"127.0.0.1", request_id=b"r1")
    assert out == [(b"host", b"h"), (b"transfer-encoding", b"chunked"), (b"via", b"1.1 egress-sidecar"),
                   (b"x-forwarded-for", b"127.0.0.1"), (b"x-request-id", b"r1")]


def test_body_framing() -> None:
    assert body_framing([]) == (False, False)
    assert body_framing([(b"content-length", b"0")]) == (False, False)
    assert body_framing([(b"content-length", b"5")]) == (True, False)
    assert body_framing([(b"transfer-encoding", b"chunked")]) == (True, True)


def test_upgrade_detection() -> None:
    assert is_upgrade([(b"upgrade", b"websocket"), (b"connection", b"upgrade")])
    assert not is_upgrade([(b"x", b"y")])


def test_downstream_headers_drop_hop_by_hop_keep_the_rest() -> None:
    headers = [(b"Set-Cookie", b"a=1"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
               (b"Transfer-Encoding", b"chunked"), (b"Set-Cookie", b"b=2"), (b"Content-Encoding", b"gzip")]
    assert downstream_response_headers(headers) == [
        (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Encoding", b"gzip")]
