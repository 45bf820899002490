"""Captured connections, the pure part: original destination, first bytes, where plain HTTP goes."""

from __future__ import annotations

import socket
import struct

import pytest

from sidecar.errors import EgressError
from sidecar.ingress.capture import captured_target, first_bytes_kind, parse_sockaddr
from sidecar.policy.hostnames import HostPatterns


def test_sockaddr_in_and_in6_as_getsockopt_returns_them() -> None:
    raw4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 443) + socket.inet_aton("10.0.0.1") + b"\0" * 8
    assert parse_sockaddr(raw4) == ("10.0.0.1", 443)
    raw6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 80) + b"\0" * 4
            + socket.inet_pton(socket.AF_INET6, "fd00:ec2::254") + b"\0" * 4)
    assert parse_sockaddr(raw6) == ("fd00:ec2::254", 80)


@pytest.mark.parametrize(("data", "kind"), [
    (b"\x16\x03\x01\x02\x00\x01", "tls"),
    (b"GET / HTTP/1.1\r\n", "http"),
    (b"PROPFIND /x", "http"),
    (b"GE", None),  # could still become a method
    (b"", None),
    (b"SSH-2.0-OpenSSH\r\n", "other"),
    (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", "other"),  # PostgreSQL's SSLRequest
    (b" GET /", "other"),
    (b"get / HTTP/1.1", "other"),  # methods are case-sensitive (RFC 9110 9.1)
    (b"A" * 21, "other"),
])
def test_first_bytes_decide_tls_http_or_other(data: bytes, kind: str | None) -> None:
    assert first_bytes_kind(data) == kind


NONE = HostPatterns([])


def test_plain_http_goes_to_the_host_header_on_the_port_dialled() -> None:
    target = captured_target([(b"host", b"api.example.com:8080")], b"/v1/x", b"a=1", ("93.184.216.34", 8080), NONE)
    assert (target.scheme, target.host, target.port, target.path, target.query) == (
        "http", "api.example.com", 8080, "/v1/x", "a=1")
    assert target.host_header == b"api.example.com:8080"
    assert target.route is None


def test_originate_tls_hosts_go_out_as_https_on_443() -> None:
    target = captured_target([(b"host", b"API.example.com")], b"/", b"", ("93.184.216.34", 80),
                             HostPatterns(["*.example.com"]))
    assert (target.scheme, target.host, target.port, target.host_header) == (
        "https", "api.example.com", 443, b"api.example.com")


def test_no_host_header_means_the_original_address() -> None:
    target = captured_target([], b"/", b"", ("fd00:ec2::254", 80), NONE)
    assert (target.host, target.port, target.host_header) == ("fd00:ec2::254", 80, b"[fd00:ec2::254]")


def test_absolute_form_target_keeps_the_path_and_the_host_header_decides() -> None:
    target = captured_target([(b"host", b"a.test")], b"http://b.test/p", b"", ("1.1.1.1", 80), NONE)
    assert (target.host, target.path) == ("a.test", "/p")


@pytest.mark.parametrize("host", [b"bad host", b"[::1", b"a.test:99999"])
def test_bad_host_header_is_bad_request(host: bytes) -> None:
    with pytest.raises(EgressError) as info:
        captured_target([(b"host", host)], b"/", b"", ("1.1.1.1", 80), NONE)
    assert info.value.kind == "bad_request"
