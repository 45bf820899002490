"""The transport's pure wire rules: request head bytes, body framing, the retry rule."""

from __future__ import annotations

import httpx
import pytest

from sidecar.upstream.transport import wire


def test_head_keeps_headers_exactly_in_order_with_repeats() -> None:
    head = wire.encode_head(
        b"GET", b"/a%2Fb?q=%7e&x=a+b",
        [(b"Host", b"api.example.com"), (b"X-Dup", b"1"), (b"x-dup", b"2"), (b"Cookie", b"c=1")],
    )
    assert head == (
        b"GET /a%2Fb?q=%7e&x=a+b HTTP/1.1\r\nHost: api.example.com\r\nX-Dup: 1\r\nx-dup: 2\r\n"
        b"Cookie: c=1\r\n\r\n"
    )


def test_head_appends_the_framing_header_we_add_last() -> None:
    head = wire.encode_head(b"POST", b"/", [(b"Host", b"h")], (b"Transfer-Encoding", b"chunked"))
    assert head.endswith(b"Host: h\r\nTransfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/", [(b"X-A", b"1\r\nX-Injected: 1")]),
        (b"/", [(b"X-A", b"bare\rcr")]),
        (b"/", [(b"X-A\n", b"1")]),
        (b"/ HTTP/1.1\r\nHost: evil\r\n\r\nGET /", [(b"Host", b"h")]),
    ],
    ids=["crlf_in_value", "bare_cr", "lf_in_name", "crlf_in_target"],
)
def test_head_refuses_line_breaks_that_would_inject(target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        wire.encode_head(b"GET", target, headers)


def test_framing_from_content_length() -> None:
    assert wire.body_framing([(b"Host", b"h"), (b"content-length", b"12")]) == (wire.Framing.LENGTH, 12)


def test_framing_from_transfer_encoding() -> None:
    assert wire.body_framing([(b"Transfer-Encoding", b"chunked")]) == (wire.Framing.CHUNKED, -1)


def test_framing_absent_leaves_the_choice_to_the_transport() -> None:
    assert wire.body_framing([(b"Host", b"h"), (b"Content-Type", b"x")]) == (None, -1)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")],
        [(b"Content-Length", b"3"), (b"Content-Length", b"4")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"ten")],
    ],
    ids=["cl_then_te", "te_then_cl", "two_lengths", "negative", "not_a_number"],
)
def test_framing_refuses_ambiguous_or_invalid_lengths(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        wire.body_framing(headers)


def test_chunk_frame_is_hex_size_line() -> None:
    assert wire.chunk_frame(255) == b"ff\r\n"
    assert wire.chunk_frame(1 << 20) == b"100000\r\n"


def test_method_bytes_for_common_and_extension_methods() -> None:
    assert wire.method_bytes("GET") == b"GET"
    assert wire.method_bytes("PROPFIND") == b"PROPFIND"


@pytest.mark.parametrize(
    ("method", "reused", "got_bytes", "clean", "replayable", "retried", "expected"),
    [
        ("GET", True, False, True, True, False, True),
        ("PUT", True, False, True, True, False, True),
        ("GET", False, False, True, True, False, False),  # a fresh connection failing is a real failure
        ("GET", True, True, True, True, False, False),  # the server had started answering
        ("GET", True, False, False, True, False, False),  # a reset is not the keep-alive race
        ("GET", True, False, True, False, False, False),  # a consumed stream cannot be sent again
        ("GET", True, False, True, True, True, False),  # once only
        ("POST", True, False, True, True, False, False),  # not idempotent (RFC 9110 9.2.2)
        ("PATCH", True, False, True, True, False, False),
    ],
)
def test_retry_only_for_the_keep_alive_race_and_only_when_safe(
    method: str, reused: bool, got_bytes: bool, clean: bool, replayable: bool, retried: bool, expected: bool
) -> None:
    assert wire.may_retry_on_fresh(method, reused, got_bytes, clean, replayable, retried) is expected


# ---- salvage: may a connection whose caller left be read to the end and kept? ----

LIMIT = 65536
CL = [(b"Content-Length", b"100")]


def salvage(
    *, sent: bool = True, head: bool = False, status: int | None = 200, version: str = "1.1",
    headers: list[tuple[bytes, bytes]] | None = None, received: int = 0, read: int = 0,
) -> bool:
    return wire.may_salvage(sent, head, status, version, CL if headers is None else headers, received, read, LIMIT)


def test_salvage_needs_the_whole_request_sent() -> None:
    assert salvage() is True
    assert salvage(sent=False) is False
    assert salvage(sent=False, status=None) is False


def test_salvage_waits_for_the_head_when_none_came_yet() -> None:
    assert salvage(status=None, headers=[]) is True


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        ("1.1", None, True),
        ("1.1", b"close", False),
        ("1.1", b"Keep-Alive, CLOSE", False),
        ("1.0", None, False),
        ("1.0", b"keep-alive", True),
    ],
)
def test_salvage_only_keep_alive_responses(version: str, connection: bytes | None, expected: bool) -> None:
    headers = [*CL, *([(b"Connection", connection)] if connection is not None else [])]
    assert salvage(version=version, headers=headers) is expected


@pytest.mark.parametrize("status", [204, 304])
def test_salvage_bodyless_statuses_whatever_their_headers(status: int) -> None:
    assert salvage(status=status, headers=[(b"Content-Length", b"999999999")]) is True


def test_salvage_head_response_has_no_body() -> None:
    assert salvage(head=True, headers=[(b"Content-Length", b"999999999")]) is True


def test_salvage_never_a_protocol_switch() -> None:
    assert salvage(status=101, headers=[]) is False


def test_salvage_content_length_within_the_limit_counting_what_came() -> None:
    assert salvage(headers=[(b"Content-Length", str(LIMIT).encode())]) is True
    assert salvage(headers=[(b"Content-Length", str(LIMIT + 1).encode())]) is False
    assert salvage(headers=[(b"Content-Length", str(LIMIT + 1000).encode())], received=1000) is True
    assert salvage(headers=[(b"content-length", b"4194304")], received=10) is False


@pytest.mark.parametrize("value", [b"abc", b"-1", b""])
def test_salvage_refuses_a_bad_content_length(value: bytes) -> None:
    assert salvage(headers=[(b"Content-Length", value)]) is False


def test_salvage_refuses_conflicting_content_lengths() -> None:
    assert salvage(headers=[(b"Content-Length", b"5"), (b"Content-Length", b"6")]) is False
    assert salvage(headers=[(b"Content-Length", b"5"), (b"Content-Length", b"5")]) is True


def test_salvage_chunked_while_the_bytes_read_stay_within_the_limit() -> None:
    chunked = [(b"Transfer-Encoding", b"chunked")]
    assert salvage(headers=chunked, read=0) is True
    assert salvage(headers=chunked, read=LIMIT) is True
    assert salvage(headers=chunked, read=LIMIT + 1) is False
    assert salvage(headers=[(b"transfer-encoding", b"gzip, Chunked ")], read=10) is True


def test_salvage_never_a_body_delimited_by_the_close() -> None:
    assert salvage(headers=[]) is False
    assert salvage(headers=[(b"Transfer-Encoding", b"gzip")]) is False


def test_response_keep_alive_reads_every_connection_header() -> None:
    assert wire.response_keep_alive("1.1", [(b"Connection", b"upgrade"), (b"connection", b"close")]) is False
    assert wire.response_keep_alive("1.0", [(b"CONNECTION", b" Keep-Alive ")]) is True
    assert wire.response_keep_alive("1.1", []) is True


# RFC 9110 9.2.2, one test per row: only these are sent again after the keep-alive race.
IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"]


def test_the_idempotent_methods_are_exactly_rfc_9110s() -> None:
    assert wire.IDEMPOTENT_METHODS == frozenset(IDEMPOTENT)


@pytest.mark.parametrize("method", [*IDEMPOTENT, "POST", "PATCH", "CONNECT", "PROPFIND"])
def test_each_method_is_retried_after_the_race_only_if_idempotent(method: str) -> None:
    assert wire.may_retry_on_fresh(method, True, False, True, True, False) is (method in IDEMPOTENT)


@pytest.mark.parametrize("name", [b"accept-charset", b"x-forwarded-proto", b"content-lengthx", b"transfer-encodin"])
def test_framing_ignores_other_names_of_the_framing_headers_lengths(name: bytes) -> None:
    # 14 and 17 bytes, the lengths of content-length and transfer-encoding, and one either side
    assert wire.body_framing([(name, b"5")]) == (None, -1)


def test_framing_reads_the_names_in_any_case() -> None:
    assert wire.body_framing([(b"Content-Length", b"7")]) == (wire.Framing.LENGTH, 7)
    assert wire.body_framing([(b"TRANSFER-ENCODING", b"chunked")]) == (wire.Framing.CHUNKED, -1)


def test_method_bytes_of_every_known_method() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"):
        assert wire.method_bytes(method) == method.encode()
    assert wire.method_bytes("PROPFIND") == b"PROPFIND"


@pytest.mark.parametrize(("headers", "message"), [
    ([(b"Content-Length", b"0"), (b"Content-Length", b"0")], "conflicting request framing headers"),
    ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")], "conflicting request framing headers"),
    ([(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")], "conflicting request framing headers"),
    ([(b"Content-Length", b"-1")], "invalid Content-Length b'-1'"),
    ([(b"Content-Length", b"x")], "invalid Content-Length b'x'"),
])
def test_framing_refusals_say_why(headers: list[tuple[bytes, bytes]], message: str) -> None:
    with pytest.raises(httpx.LocalProtocolError) as error:
        wire.body_framing(headers)
    assert str(error.value) == message


def test_framing_of_an_empty_body_by_length() -> None:
    assert wire.body_framing([(b"Content-Length", b"0")]) == (wire.Framing.LENGTH, 0)


def test_head_refusal_says_why() -> None:
    with pytest.raises(httpx.LocalProtocolError) as error:
        wire.encode_head(b"GET", b"/\r\n", [])
    assert str(error.value) == "CR or LF inside the request target or a header"


def test_salvage_refuses_conflicting_lengths_even_when_the_first_is_zero() -> None:
    headers = [(b"Content-Length", b"0"), (b"Content-Length", b"5")]
    assert not wire.may_salvage(True, False, 200, "1.1", headers, 0, 0, 65536)


def test_salvage_a_response_with_an_empty_body_by_length() -> None:
    assert wire.may_salvage(True, False, 200, "1.1", [(b"Content-Length", b"0")], 0, 0, 0)


def test_keep_alive_reads_comma_separated_tokens_without_spaces() -> None:
    assert wire.response_keep_alive("1.1", [(b"Connection", b"keep-alive,close")]) is False


@pytest.mark.parametrize(
    ("status", "role"),
    [(100, wire.HeadRole.INTERIM), (103, wire.HeadRole.INTERIM), (101, wire.HeadRole.REFUSED),
     (200, wire.HeadRole.FINAL), (204, wire.HeadRole.FINAL), (304, wire.HeadRole.FINAL),
     (502, wire.HeadRole.FINAL)],
)
def test_response_head_role(status: int, role: wire.HeadRole) -> None:
    # 101 is never relayed: the sidecar asks no upstream for an upgrade.
    assert wire.response_head_role(status) is role


@pytest.mark.parametrize(
    ("complete", "active", "surplus"),
    [(False, True, False), (True, True, True), (False, False, True), (True, False, True)],
)
def test_bytes_after_the_complete_response_or_with_no_exchange_are_surplus(
    complete: bool, active: bool, surplus: bool
) -> None:
    assert wire.is_surplus(complete, active) is surplus
