"""Header rules in both directions. Pure."""

from __future__ import annotations

import pytest

from sidecar.proxy.headers import (
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


# Every hop-by-hop name (RFC 9110 7.6.1), one test per row.
HOP_BY_HOP_NAMES = [b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"]


def test_the_hop_by_hop_table_is_exactly_rfc_9110s() -> None:
    from sidecar.proxy.headers import HOP_BY_HOP

    assert HOP_BY_HOP == frozenset(HOP_BY_HOP_NAMES)


@pytest.mark.parametrize("name", HOP_BY_HOP_NAMES)
def test_each_hop_by_hop_name_stops_at_the_sidecar_both_ways(name: bytes) -> None:
    headers = [(b"x-before", b"1"), (name, b"v"), (b"x-after", b"2")]
    assert upstream_request_headers(headers, b"h") == [(b"host", b"h"), (b"x-before", b"1"), (b"x-after", b"2")]
    upper = [(b"X-Before", b"1"), (name.upper(), b"v"), (b"X-After", b"2")]
    assert downstream_response_headers(upper) == [(b"X-Before", b"1"), (b"X-After", b"2")]


def test_end_to_end_headers_pass_both_ways() -> None:
    headers = [(b"authorization", b"a"), (b"te-x", b"1"), (b"x-upgrade", b"2"), (b"x-content-length", b"3")]
    assert upstream_request_headers(headers, b"h")[1:] == headers
    assert downstream_response_headers(headers) == headers


def test_a_name_listed_in_a_response_connection_header_is_dropped_in_any_case() -> None:
    headers = [(b"Connection", b"X-Private , ,close"), (b"X-Private", b"1"), (b"X-Kept", b"2")]
    assert downstream_response_headers(headers) == [(b"X-Kept", b"2")]
    assert connection_tokens(headers) == {b"x-private", b"close"}


def test_the_apps_host_is_replaced_and_connection_tokens_read_only_when_present() -> None:
    headers = [(b"host", b"sidecar:15001"), (b"x-private", b"1")]
    assert upstream_request_headers(headers, b"api") == [(b"host", b"api"), (b"x-private", b"1")]


def test_request_ids_are_read_and_made() -> None:
    from sidecar.proxy.headers import new_request_id, request_id_of

    assert request_id_of([(b"x-a", b"1"), (b"x-request-id", b"abc"), (b"x-request-id", b"def")]) == b"abc"
    assert request_id_of([(b"x-a", b"1")]) is None
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(i == i.lower() for i in ids)  # lower-case hex, as uuid4's text


def test_a_response_of_only_hop_by_hop_headers_loses_them_all() -> None:
    assert downstream_response_headers([(b"Connection", b"close"), (b"Keep-Alive", b"timeout=5")]) == []


def test_a_repeated_or_unwanted_content_length_is_skipped_not_the_headers_after_it() -> None:
    headers = [(b"content-length", b"05"), (b"content-length", b"05"), (b"x-after", b"1")]
    assert upstream_request_headers(headers, b"h", content_length=b"5") == [
        (b"host", b"h"), (b"content-length", b"5"), (b"x-after", b"1")]
    assert upstream_request_headers(headers, b"h") == [(b"host", b"h"), (b"x-after", b"1")]
