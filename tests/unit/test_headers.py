"""Header rules in both directions. Pure."""

from __future__ import annotations

from sidecar.headers import (
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


def test_framing_look_alikes_are_dropped_in_any_case() -> None:
    # uvicorn hands names lower-cased, whatever the app wrote (Transfer_Encoding, CONTENT_LENGTH).
    headers = [(b"content-length", b"2"), (b"transfer_encoding", b"chunked"), (b"x-a", b"1"),
               (b"content_length", b"99"), (b"x_under", b"kept")]
    out = upstream_request_headers(headers, b"h", content_length=b"2")
    assert out == [(b"host", b"h"), (b"content-length", b"2"), (b"x-a", b"1"), (b"x_under", b"kept")]


def test_content_length_goes_as_the_normalised_number_in_its_place_and_once() -> None:
    headers = [(b"x-a", b"1"), (b"content-length", b"0012"), (b"x-b", b"2"), (b"content-length", b"12")]
    out = upstream_request_headers(headers, b"h", content_length=b"12")
    assert out == [(b"host", b"h"), (b"x-a", b"1"), (b"content-length", b"12"), (b"x-b", b"2")]
    # framing found no length to send (a chunked body): no Content-Length goes, whatever came.
    assert upstream_request_headers([(b"content-length", b"5")], b"h", chunked=True) == [
        (b"host", b"h"), (b"transfer-encoding", b"chunked")]


def test_upgrade_detection() -> None:
    assert is_upgrade([(b"upgrade", b"websocket"), (b"connection", b"upgrade")])
    assert not is_upgrade([(b"x", b"y")])


def test_downstream_headers_drop_hop_by_hop_keep_the_rest() -> None:
    headers = [(b"Set-Cookie", b"a=1"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
               (b"Transfer-Encoding", b"chunked"), (b"Set-Cookie", b"b=2"), (b"Content-Encoding", b"gzip")]
    assert downstream_response_headers(headers) == [
        (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Encoding", b"gzip")]


def test_fast_request_equals_httpx_request() -> None:
    import httpx

    from sidecar.forward import build_request

    headers = [(b"host", b"api.example.com"), (b"x-a", b"1"), (b"x-a", b"2"), (b"content-type", b"text/plain")]
    url = httpx.URL("https://api.example.com/x?y=1")
    stream = httpx.ByteStream(b"")
    fast = build_request("POST", url, headers, stream, {"timeout": {}})
    slow = httpx.Request("POST", url, headers=headers, stream=stream, extensions={"timeout": {}})
    assert (fast.method, fast.url, fast.headers.raw, fast.extensions) == (
        slow.method, slow.url, slow.headers.raw, slow.extensions)
    assert fast.headers.get_list("x-a") == ["1", "2"] and fast.headers["Content-Type"] == "text/plain"
    assert fast.headers.multi_items() == slow.headers.multi_items()
