"""IP addresses as an egress policy must see them: every literal spelling, every embedding.

Pure functions, no I/O. `parse_ip_literal` turns whatever an app may write as a host
(`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`, `[::ffff:127.0.0.1]`, `fe80::1%25eth0`) into
one address, the way the resolver behind it would (glibc `inet_aton`, the WHATWG URL host
parser). `denial_reason` names why an address is not a public destination; IPv6 forms that
carry an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are judged by that IPv4.
"""

from __future__ import annotations

import ipaddress
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# A dotted IPv4 part as inet_aton reads it: hex (0x..), octal (leading 0), or decimal.
_V4_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")

# Cloud metadata endpoints first: they get their own reason even where a broader range would
# also deny them, so the audit log says what was attempted.
_METADATA: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.169.254/32",  # AWS, GCP, Azure IMDS, OpenStack, DigitalOcean
        "169.254.170.2/32",  # AWS ECS task metadata / credentials
        "169.254.170.23/32",  # AWS EKS Pod Identity agent
        "fd00:ec2::254/128",  # AWS IMDS over IPv6
        "fd00:ec2::23/128",  # AWS EKS Pod Identity agent over IPv6
        "100.100.100.200/32",  # Alibaba Cloud
        "168.63.129.16/32",  # Azure WireServer: public space, but a host-local control channel
    )
)

# Ordered: the first match names the reason. IPv6 forms that embed an IPv4 never get here
# (see `denial_reason`), so `::ffff:0:0/96` and friends need no entry.
_DENIED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),  # "this network"; Linux connects 0.0.0.0 to itself
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("169.254.0.0/16", "link_local"),
        ("100.64.0.0/10", "cgnat"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255 broadcast
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "reserved"),  # TEST-NET-1
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),  # TEST-NET-2
        ("203.0.113.0/24", "reserved"),  # TEST-NET-3
        ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast (deprecated)
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "private"),  # unique local, incl. fd00:ec2::254
        ("fec0::/10", "private"),  # deprecated site-local
        ("fe80::/10", "link_local"),
        ("ff00::/8", "multicast"),
        ("64:ff9b:1::/48", "private"),  # local-use NAT64 (RFC 8215)
        ("100::/64", "reserved"),  # discard-only
        ("2001:db8::/32", "reserved"),  # documentation
    )
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT "IPv4-translated" (RFC 2765)
_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def _v4_part(text: str) -> int:
    if text[:2] in ("0x", "0X"):
        return int(text, 16) if len(text) > 2 else 0  # WHATWG: a bare "0x" is zero
    if len(text) > 1 and text[0] == "0":
        return int(text, 8)  # ValueError on 8 or 9, as inet_aton fails
    return int(text, 10)


def _parse_v4(host: str) -> IPv4Address | None:
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # WHATWG drops one empty last part: "127.0.0.1." is an address
    if not _V4_PART.match(parts[-1]):
        return None  # the last label is not a number: a name
    if len(parts) > 4 or not all(_V4_PART.match(p) for p in parts):
        raise ValueError(f"{host!r} looks like an IPv4 address but is not one")
    numbers = [_v4_part(p) for p in parts]
    head, last = numbers[:-1], numbers[-1]
    # inet_aton: every part but the last is one byte; the last fills the remaining bytes.
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError(f"{host!r} is out of range for an IPv4 address")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return IPv4Address(value)


def _parse_v6(text: str) -> IPv6Address:
    # A zone id (`fe80::1%eth0`, URL-encoded as `%25eth0`) does not change which range the
    # address is in; drop it.
    base = text.split("%", 1)[0]
    try:
        return IPv6Address(base)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IPv6 address") from None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address `host` denotes if it is an IP literal in any spelling, None if it is a name.

    Raises ValueError for a host that is neither: numeric-looking but out of range
    (`1.2.3.4.5`, `256.1.1.1`, `09.1.1.1`) or a broken IPv6 literal. Such hosts must be
    refused, not looked up: resolvers disagree on what they mean.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        return _parse_v6(text[1:-1])
    if ":" in text:
        return _parse_v6(text)
    if not text:
        raise ValueError("empty host")
    return _parse_v4(text)


def embedded_ipv4(address: IPv6Address) -> tuple[IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo)."""
    packed = int(address)
    low32 = IPv4Address(packed & 0xFFFFFFFF)
    if address in _MAPPED or address in _TRANSLATED or address in _NAT64:
        return (low32,)
    if address in _COMPAT and packed > 1:  # `::` and `::1` are themselves, not IPv4
        return (low32,)
    if address in _SIXTOFOUR:
        return (IPv4Address((packed >> 80) & 0xFFFFFFFF),)
    if address in _TEREDO:
        server = IPv4Address((packed >> 64) & 0xFFFFFFFF)
        client = IPv4Address(~packed & 0xFFFFFFFF)  # RFC 4380: the client address is inverted
        return (server, client)
    return ()


def effective_addresses(address: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses a connection to `address` is judged by: the embedded IPv4s, or itself."""
    if isinstance(address, IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded:
            return embedded
    return (address,)


def _reason_for(address: IPAddress) -> str | None:
    for network in _METADATA:
        if address in network:
            return "metadata"
    for network, reason in _DENIED:
        if address in network:
            return reason
    if not address.is_global:
        return "reserved"  # whatever else IANA marks not globally reachable
    return None


def denial_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public destination (`private`, `loopback`, `metadata`, ...), or None.

    An IPv6 address that embeds IPv4 is judged by every IPv4 it embeds: a Teredo address
    is denied if either its server or its client address is.
    """
    for effective in effective_addresses(address):
        reason = _reason_for(effective)
        if reason is not None:
            return reason
    return None


def parse_network(text: str) -> IPNetwork:
    """A CIDR range from config (`10.20.0.0/16`, `fd00::/8`, a bare address as a /32 or /128)."""
    return ipaddress.ip_network(text.strip().strip("[]"), strict=False)


def in_networks(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether `address`, or an IPv4 it embeds, lies in one of `networks`."""
    return any(a in n for a in effective_addresses(address) for n in networks if a.version == n.version)
