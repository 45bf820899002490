"""The HTTP/2 request rules: the header block and when a refused stream is sent again."""

from __future__ import annotations

from sidecar.upstream.transport.h2_request import MAX_REPLAYS, may_replay, request_headers


def test_pseudo_headers_come_first_and_host_becomes_the_authority() -> None:
    block = request_headers(b"GET", b"https", b"a.test:8443", b"/x?y=1",
                            [(b"Host", b"api.test"), (b"Accept", b"*/*"), (b"x-id", b"1")])
    assert block == [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"api.test"),
                     (b":path", b"/x?y=1"), (b"accept", b"*/*"), (b"x-id", b"1")]


def test_connection_specific_fields_are_dropped_and_order_and_repeats_kept() -> None:
    block = request_headers(b"POST", b"https", b"a.test", b"/", [
        (b"connection", b"keep-alive"), (b"keep-alive", b"5"), (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"), (b"proxy-connection", b"close"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
        (b"te", b"gzip"), (b"TE", b"trailers"),
    ])
    assert block[4:] == [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")]
    assert block[2] == (b":authority", b"a.test")  # no Host: the URL's authority


def test_an_empty_path_is_sent_as_slash() -> None:
    assert request_headers(b"GET", b"https", b"a.test", b"", [])[3] == (b":path", b"/")


def test_a_refused_stream_is_replayed_while_its_body_is_whole_and_a_few_times_only() -> None:
    assert may_replay(0, True)
    assert may_replay(MAX_REPLAYS - 1, True)
    assert not may_replay(MAX_REPLAYS, True)
    assert not may_replay(0, False)  # a body larger than the replay limit already went out
