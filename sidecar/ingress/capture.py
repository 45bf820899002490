"""Captured connections (the egress lock), the pure part: where a redirected connection was going,
what its first bytes are, and where a captured plain-HTTP request goes.

The lock's NAT rule (lock_rules.py) rewrites the destination of every outbound TCP connection
of the app to the transparent listener; the kernel keeps the original one in conntrack, and
`SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6) hands it back. The I/O around these
functions is in transparent.py.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Literal

from sidecar.errors import EgressError
from sidecar.policy.hostnames import HostPatterns, canonical_host
from sidecar.proxy.routing import DEFAULT_PORTS, Target, normalise_host, split_authority

# linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h IP6T_SO_ORIGINAL_DST.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = 0
SOL_IPV6 = 41
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28

Address = tuple[str, int]
FirstBytes = Literal["tls", "http", "other"]
_LONGEST_METHOD = 20  # longer than any registered HTTP method token (RFC 9110 section 9)


def parse_sockaddr(raw: bytes) -> Address:
    """(address, port) of a `struct sockaddr_in` or `sockaddr_in6` as getsockopt returns it."""
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unknown address family {family}")


def original_destination(sock: socket.socket) -> Address | None:
    """Where the app dialled before the lock redirected it; None when conntrack knows nothing."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
    except OSError:
        return None  # ENOENT: no conntrack entry (not redirected, or conntrack not loaded)
    address, port = parse_sockaddr(raw)
    mapped = ipaddress.ip_address(address)
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        address = str(mapped.ipv4_mapped)
    return address, port


def first_bytes_kind(data: bytes) -> FirstBytes | None:
    """What a captured connection speaks, from its first bytes; None: too few bytes to tell.

    TLS: a handshake record (content type 22, RFC 8446 section 5.1). HTTP/1.x: a method
    token of upper-case letters then a space (RFC 9112 section 3). Anything else (SSH's
    banner, a database protocol, HTTP/2 without TLS after its preface check) is `other`.
    """
    if not data:
        return None
    if data[0] == 0x16:
        return "tls"
    head = data[: _LONGEST_METHOD + 1]
    space = head.find(b" ")
    token = head if space < 0 else head[:space]
    if not (token.isalpha() and token.isupper()) and token:
        return "other"
    if space < 0:
        return None if len(head) <= _LONGEST_METHOD else "other"
    return "http" if space > 0 else "other"


def captured_target(
    headers: list[tuple[bytes, bytes]],
    raw_path: bytes,
    query: bytes,
    original: Address,
    originate_tls: HostPatterns,
) -> Target:
    """Where a captured plain-HTTP request goes: the Host header decides, as in forward-proxy form.

    To `http://` on the port the app dialled, unless the host is one of
    `lock.originate_tls_hosts` (then HTTPS on 443: the app's plain-HTTP call is encrypted on
    the wire). No Host header (HTTP/1.0): the original address itself.
    """
    if not raw_path.isascii() or not query.isascii():
        raise EgressError("bad_request", "non-ASCII bytes in the request target")
    if raw_path[:1] != b"/":
        if raw_path[:7].lower() != b"http://":
            raise EgressError("bad_request", "a captured request's target must be an absolute path")
        raw_path = b"/" + raw_path[7:].partition(b"/")[2]  # absolute form: the Host header still decides
    host_value = next((value for name, value in headers if name == b"host"), None)
    try:
        if host_value is None:
            host = original[0]
        else:
            host = normalise_host(split_authority(host_value.decode("ascii"))[0])
    except (ValueError, UnicodeError) as exc:
        raise EgressError("bad_request", f"bad Host header: {exc}") from None
    scheme, port = "http", original[1]
    try:
        if originate_tls and originate_tls.matches(canonical_host(host)):
            scheme, port = "https", 443
    except ValueError:
        pass  # not a valid host name: the policy refuses it as invalid_host
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    return Target(None, scheme, host, port, raw_path.decode("ascii"), query.decode("ascii") or None,
                  host_header.encode("ascii"))
