"""The ClientHello parser (sidecar/tunnel/sni.py) on real hellos from Python's ssl, split every way."""

from __future__ import annotations

import pytest

from sidecar.tunnel.sni import (
    MAX_HELLO_RECORDS,
    ClientHello,
    Incomplete,
    NotClientHello,
    names_match,
    parse_client_hello,
)
from tests.e2e.connect_support import client_hello as real_hello


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message re-split into TLS records of at most `size` bytes."""
    assert hello[0] == 0x16
    message = hello[5:]
    records = []
    for offset in range(0, len(message), size):
        part = message[offset : offset + size]
        records.append(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part)
    return b"".join(records)


def test_real_hello_gives_its_server_name() -> None:
    assert parse_client_hello(real_hello("api.example.com")) == ClientHello("api.example.com")


def test_hello_without_sni_gives_none() -> None:
    assert parse_client_hello(real_hello(None)) == ClientHello(None)


def test_every_prefix_is_incomplete_until_the_last_byte() -> None:
    hello = real_hello("api.example.com")
    for end in range(len(hello)):
        result = parse_client_hello(hello[:end])
        assert isinstance(result, Incomplete), end
        # `need`: the first byte, the end of the record header, then of the record: never more.
        assert end < result.need <= len(hello) and result.need in (1, 5, len(hello)), (end, result)
    assert parse_client_hello(hello) == ClientHello("api.example.com")


@pytest.mark.parametrize("size", [40, 64, 300])
def test_hello_fragmented_over_records_is_reassembled(size: int) -> None:
    data = refragment(real_hello("fragmented.example.com"), size)
    assert parse_client_hello(data) == ClientHello("fragmented.example.com")
    assert parse_client_hello(data[:-1]) == Incomplete(len(data))


def test_a_hello_in_too_many_records_is_refused() -> None:
    hello = real_hello("x.example")
    assert parse_client_hello(refragment(hello, (len(hello) - 5) // MAX_HELLO_RECORDS + 1)) == ClientHello("x.example")
    assert "records" in _bad(refragment(hello, 1))


def test_bytes_after_the_hello_do_not_matter() -> None:
    # A client may send more (early data) right behind its hello.
    assert parse_client_hello(real_hello("a.example") + b"\x17\x03\x03\x00\x05hello") == ClientHello("a.example")


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"CONNECT x:443 HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n", b"\x80\x2e\x01\x03\x01"],
    ids=["http", "connect", "ssh", "sslv2"],
)
def test_plaintext_first_bytes_are_not_tls(data: bytes) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, NotClientHello) and result.reason == "not_tls"


def test_a_single_non_tls_byte_is_enough_to_decide() -> None:
    assert isinstance(parse_client_hello(b"G"), NotClientHello)


def _bad(data: bytes) -> str:
    result = parse_client_hello(data)
    assert isinstance(result, NotClientHello) and result.reason == "bad_hello", result
    return result.detail


def test_a_server_hello_or_other_message_is_refused() -> None:
    hello = bytearray(real_hello("x.example"))
    hello[5] = 0x02  # ServerHello
    assert "not a ClientHello" in _bad(bytes(hello))


def test_an_alert_record_before_the_hello_is_complete_is_refused() -> None:
    hello = refragment(real_hello("x.example"), 50)
    assert "record type 21" in _bad(hello[:55] + b"\x15\x03\x03\x00\x02\x02\x28")


def test_oversized_record_length_is_refused() -> None:
    assert "record length" in _bad(b"\x16\x03\x01\x48\x01" + b"\x01" * 10)


def test_hello_over_the_bound_is_refused() -> None:
    assert "bound" in parse_client_hello(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", limit=1024).detail  # type: ignore[union-attr]


def _hello_with_names(*names: tuple[int, bytes], twice: bool = False) -> bytes:
    entries = b"".join(bytes([kind]) + len(name).to_bytes(2, "big") + name for kind, name in names)
    sni = len(entries).to_bytes(2, "big") + entries
    extension = b"\x00\x00" + len(sni).to_bytes(2, "big") + sni
    extensions = extension * (2 if twice else 1)
    body = (b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(extensions).to_bytes(2, "big") + extensions)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def test_hand_built_hello_parses() -> None:
    assert parse_client_hello(_hello_with_names((0, b"api.example.com"))) == ClientHello("api.example.com")


def test_two_host_names_are_refused() -> None:
    assert "two host names" in _bad(_hello_with_names((0, b"good.example"), (0, b"evil.example")))


def test_server_name_extension_twice_is_refused() -> None:
    assert "twice" in _bad(_hello_with_names((0, b"good.example"), twice=True))


def test_non_ascii_server_name_is_refused() -> None:
    assert "ASCII" in _bad(_hello_with_names((0, "bücher.example".encode())))


def test_truncated_lengths_are_refused() -> None:
    hello = bytearray(_hello_with_names((0, b"api.example.com")))
    hello[-16] = 0x40  # the host name's length now runs past the extension
    assert _bad(bytes(hello))


@pytest.mark.parametrize(
    ("sni", "host", "match"),
    [
        ("api.example.com", "api.example.com", True),
        ("API.Example.COM", "api.example.com", True),
        ("api.example.com.", "api.example.com", True),
        ("xn--bcher-kva.example", "bücher.example", True),
        ("evil.example", "api.example.com", False),
        ("api.example.com.evil", "api.example.com", False),
        ("bad name", "api.example.com", False),
    ],
)
def test_names_match_like_host_rules(sni: str, host: str, match: bool) -> None:
    assert names_match(sni, host) is match
