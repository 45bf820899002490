"""Every IP spelling an app can write is normalised, and every range is named."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.policy.addresses import (
    denial_reason,
    embedded_ipv4,
    in_networks,
    parse_ip_literal,
    parse_network,
)

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.1", "0x7f.0.0.1", "127.1", "127.0.1",
        "0x7f000001", "017700000001", "0X7F.0X0.0X0.0X1", "127.0.0.1.", "0177.1", "127.000.000.001",
    ],
)
def test_every_ipv4_spelling_of_loopback_normalises(spelling: str) -> None:
    assert parse_ip_literal(spelling) == LOOPBACK


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("[::1]", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("[0:0:0:0:0:ffff:7f00:1]", "::ffff:7f00:1"),
        ("::FFFF:169.254.169.254", "::ffff:a9fe:a9fe"),
        ("[fe80::1%25eth0]", "fe80::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("[FD00:EC2::254]", "fd00:ec2::254"),
    ],
)
def test_ipv6_literals_bracketed_or_not_and_with_zone(spelling: str, expected: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.ip_address(expected)


@pytest.mark.parametrize("name", ["api.github.com", "localhost", "1.2.3.example", "0xg", "a-1.b"])
def test_names_are_not_literals(name: str) -> None:
    assert parse_ip_literal(name) is None


@pytest.mark.parametrize(
    "broken", ["1.2.3.4.5", "256.1.1.1", "09.1.1.1", "1.16777216", "4294967296", "[::g]", "1::2::3", "", "foo.08"]
)
def test_numeric_looking_hosts_that_are_not_addresses_are_errors(broken: str) -> None:
    with pytest.raises(ValueError):
        parse_ip_literal(broken)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
        ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
        ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
        ("192.168.1.1", "private"), ("fc00::1", "private"), ("fd00:1::1", "private"),
        ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"), ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"), ("168.63.129.16", "metadata"),
        ("169.254.1.1", "link_local"), ("fe80::1", "link_local"),
        ("100.64.0.1", "cgnat"), ("100.127.255.254", "cgnat"),
        ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"), ("198.18.0.1", "reserved"),
        ("192.0.2.1", "reserved"), ("203.0.113.9", "reserved"), ("2001:db8::1", "reserved"),
        ("100::1", "reserved"),
    ],
)
def test_denied_ranges_are_named(address: str, reason: str) -> None:
    assert denial_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:0:a00:1", "private"),  # SIIT IPv4-translated
        ("::10.0.0.1", "private"),  # IPv4-compatible (deprecated)
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", "metadata"),  # 6to4 of 169.254.169.254
        ("2002:c0a8:0101::", "private"),  # 6to4 of 192.168.1.1
        ("2001:0:0a00:0001::", "private"),  # Teredo with server 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client ~ = 127.0.0.1
        ("64:ff9b:1::1", "private"),
    ],
)
def test_ipv6_forms_are_judged_by_the_embedded_ipv4(address: str, reason: str) -> None:
    assert denial_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address", ["1.1.1.1", "8.8.8.8", "140.82.112.3", "2606:4700:4700::1111", "::ffff:1.1.1.1", "64:ff9b::808:808"]
)
def test_public_addresses_pass(address: str) -> None:
    assert denial_reason(ipaddress.ip_address(address)) is None


def test_teredo_embeds_server_and_inverted_client() -> None:
    server, client = embedded_ipv4(ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))
    assert (str(server), str(client)) == ("65.54.227.120", "192.0.2.45")


def test_allow_cidrs_match_embedded_forms_too() -> None:
    nets = (parse_network("10.20.0.0/16"),)
    assert in_networks(ipaddress.ip_address("10.20.3.4"), nets)
    assert in_networks(ipaddress.ip_address("::ffff:10.20.3.4"), nets)
    assert not in_networks(ipaddress.ip_address("10.21.0.1"), nets)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_decimal_hex_and_octal_spellings_agree_with_dotted(value: int) -> None:
    dotted = ipaddress.IPv4Address(value)
    assert parse_ip_literal(str(value)) == dotted
    assert parse_ip_literal(hex(value)) == dotted
    assert parse_ip_literal("0" + oct(value)[2:]) == dotted
    a, b, c, d = dotted.packed
    assert parse_ip_literal(f"{a}.{(b << 16) | (c << 8) | d}") == dotted
    assert parse_ip_literal(f"{oct(a).replace('0o', '0')}.{hex(b)}.{c}.{d}") == dotted


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_mapped_form_is_judged_like_the_ipv4(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert denial_reason(mapped) == denial_reason(v4)


@pytest.mark.parametrize("broken", ["1.1.256.1", "1.256.1.1", "1.1.1.256", "1.65536.1", "1.1.65536", "0x100.1.1.1"])
def test_out_of_range_parts_are_not_addresses(broken: str) -> None:
    with pytest.raises(ValueError):
        parse_ip_literal(broken)


@pytest.mark.parametrize(("spelling", "expected"), [
    ("1.1.255.1", "1.1.255.1"), ("1.255.65535", "1.255.255.255"), ("1.16777215", "1.255.255.255"),
    ("0x", "0.0.0.0"), ("0x0a.0", "10.0.0.0"), ("012.0.0.1", "10.0.0.1"), ("4294967295", "255.255.255.255"),
    ("1.1.1.1.", "1.1.1.1"),  # WHATWG drops one empty last part
])
def test_boundary_spellings_are_addresses(spelling: str, expected: str) -> None:
    assert parse_ip_literal(spelling) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(("broken", "message"), [
    ("1.2.3.4.5", "'1.2.3.4.5' looks like an IPv4 address but is not one"),
    ("1.x.3.4", "'1.x.3.4' looks like an IPv4 address but is not one"),
    ("1.256.1.1", "'1.256.1.1' is out of range for an IPv4 address"),
    ("", "empty host"),
    ("  ", "empty host"),
    ("[::G]", "'::g' is not a valid IPv6 address"),
    ("[::1", "'[::1' is not a valid IPv6 address"),
])
def test_refusals_say_why(broken: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_ip_literal(broken)
    assert str(error.value) == message


def test_one_number_with_a_trailing_dot_is_an_address() -> None:
    assert parse_ip_literal("1.") == ipaddress.ip_address("0.0.0.1")


def test_a_zone_id_is_dropped_up_to_its_first_percent() -> None:
    assert parse_ip_literal("fe80::1%eth0%x") == ipaddress.ip_address("fe80::1")


@pytest.mark.parametrize(("address", "reason"), [
    ("2001:2::1", "reserved"),  # not globally reachable, not in our table: IANA's registry decides
    ("::2", "unspecified"),  # IPv4-compatible ::0.0.0.2 is judged as 0.0.0.2
])
def test_reasons_outside_the_table(address: str, reason: str) -> None:
    assert denial_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(("text", "network"), [
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits allowed (not strict)
    (" [fd00::1] ", "fd00::1/128"),
    ("192.0.2.7", "192.0.2.7/32"),
])
def test_config_networks_are_read_leniently(text: str, network: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(network)


def test_config_networks_strip_only_brackets_and_spaces() -> None:
    with pytest.raises(ValueError):
        parse_network("X10.0.0.1X")
