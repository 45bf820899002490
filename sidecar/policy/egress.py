"""Egress policy: which destinations the app may reach, decided before any byte goes upstream.

Two checks, smokescreen-style, each denial with a named reason that reaches the access log
and `egress_denied_total{reason}`:
- `check_target` (pure, per request, cached): host rules (`policy.default`, `allow_hosts`,
  `deny_hosts`), literal IPs in every spelling, names the static `resolve:` map points at a
  denied address, and the sidecar's own listeners.
  In `policy.mode: report` a refusal by the host rules (`host_denied`, `not_allowed`) does not
  raise: `check_target` returns its reason (a would-deny) and the request goes on. The address
  rules never relax, in any mode: report mode is for learning which names an app calls, and a
  name or literal that leads to a private, metadata or loopback address, or to the sidecar
  itself, is an SSRF path, not a destination to learn about.
- `resolve` (the connect guard, per new upstream connection): resolves the name (static map
  first, then the system resolver), checks EVERY address and returns them; the transport
  connects to exactly those addresses, so an answer that changes between check and connect
  (DNS rebinding) cannot slip through. A name with one public and one private address is
  denied as a whole: a client that picks among them must not be steerable to the private one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol

from sidecar.config import Config, is_loopback_host
from sidecar.errors import EgressError, NameNotResolved
from sidecar.policy import metadata as metadata_module
from sidecar.policy.addresses import (
    IPAddress,
    IPNetwork,
    denial_reason,
    effective_addresses,
    in_networks,
    parse_ip_literal,
    parse_network,
)
from sidecar.policy.hostnames import HostPatterns, canonical_host

DenialKind = Literal["denied_host", "denied_ip", "denied_port"]

# reason -> how the one-line body describes it: host reasons as a predicate ("x is on the deny
# list"), address reasons as a noun ("x is / resolves to a private address"). The body names
# the host the app asked for, never the resolved addresses (the failing one goes to the log).
REASONS: Mapping[str, str] = {
    "host_denied": "is on the deny list",
    "not_allowed": "is not on the allow list",
    "invalid_host": "is not a valid host name or address",
    "listener": "is this sidecar's own listener",
    "port": "is not a port CONNECT may reach (policy.connect_ports)",
    "metadata": "a cloud metadata address",
    "loopback": "a loopback address",
    "unspecified": "an unspecified address",
    "private": "a private address",
    "link_local": "a link-local address",
    "cgnat": "a carrier-grade NAT address",
    "multicast": "a multicast address",
    "reserved": "a reserved address",
}
_HOST_REASONS = frozenset({"host_denied", "not_allowed", "invalid_host", "listener", "port"})
# The host rules report mode turns into would-deny; an invalid name is refused in every mode.
REPORTABLE = frozenset({"host_denied", "not_allowed"})
# A cached decision: (kind, reason, failing address); kind None is a would-deny (report mode).
Decision = tuple[DenialKind | None, str, str | None]

_WILDCARDS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


class PolicyDenied(EgressError):
    """The policy refused a destination: kind `denied_host` or `denied_ip`, and a named reason.

    `subject` (the response body) names the host and the reason; `detail` (the log line)
    adds the address that failed; `reason` labels `egress_denied_total`.
    """

    def __init__(
        self, kind: DenialKind, reason: str, host: str, address: str | None = None, why: str | None = None
    ) -> None:
        shown = _printable(host)
        if reason in _HOST_REASONS:
            subject = f"{shown} {REASONS[reason]}"
        elif address is not None and not _is_literal(host):
            subject = f"{shown} resolves to {REASONS[reason]}"
        else:
            subject = f"{shown} is {REASONS[reason]}"
        detail = f"reason={reason} host={shown}" + (f" address={address}" if address else "")
        if why:
            detail += f" ({_printable(why)})"
        super().__init__(kind, detail, subject)
        self.reason = reason
        self.host = host
        self.address = address


def _is_literal(host: str) -> bool:
    try:
        return parse_ip_literal(host) is not None
    except ValueError:
        return False


class _HasTarget(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def route(self) -> object | None: ...


def _printable(host: str) -> str:
    """The host as it may appear in a one-line body or log: printable ASCII, bounded."""
    text = host.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 100 else text[:97] + "..."


def _addresses(text: str | Sequence[str]) -> tuple[IPAddress, ...]:
    items = [text] if isinstance(text, str) else list(text)
    return tuple(ipaddress.ip_address(item.strip().strip("[]")) for item in items)


class EgressPolicy:
    """The compiled policy: built once from config, read on the hot path, never re-parsed."""

    def __init__(
        self,
        *,
        default: Literal["allow-public", "deny"] = "allow-public",
        mode: Literal["enforce", "report"] = "enforce",
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
        allow_cidrs: Iterable[str] = (),
        static_resolve: Mapping[str, str | Sequence[str]] | None = None,
        listeners: Iterable[tuple[str, int]] = (),
        local_addresses: Iterable[IPAddress] = (),
        metadata: Literal["deny", "identity"] = "deny",
    ) -> None:
        self.default = default
        self.mode = mode
        # policy.metadata: identity: requests to these hosts are decided by metadata.py instead of
        # the address rules (forward.py), and the connect guard dials them (resolve). Empty: deny.
        self.identity_hosts: frozenset[str] = metadata_module.IDENTITY_HOSTS if metadata == "identity" else frozenset()
        self._allow = HostPatterns(list(allow_hosts))
        self._deny = HostPatterns(list(deny_hosts))
        self._allow_cidrs: tuple[IPNetwork, ...] = tuple(parse_network(c) for c in allow_cidrs)
        self._static: dict[str, tuple[IPAddress, ...]] = {
            canonical_host(name): _addresses(value) for name, value in (static_resolve or {}).items()
        }
        self._local: frozenset[IPAddress] = frozenset(local_addresses)
        self._listeners: set[tuple[IPAddress, int]] = set()
        # Per-request decisions are pure in (host, port, routed): cache them. Bounded, so a
        # stream of random names cannot grow memory.
        self._decide = functools.lru_cache(maxsize=8192)(self._decide_uncached)
        for host, port in listeners:
            self.add_listener(host, port)

    @classmethod
    def from_config(cls, config: Config, local: frozenset[IPAddress] | None = None) -> EgressPolicy:
        """The policy of `config`; `local`: this host's addresses if already known (a reload)."""
        policy = config.policy
        return cls(
            default=policy.default,
            mode=policy.mode,
            allow_hosts=policy.allow_hosts,
            deny_hosts=policy.deny_hosts,
            allow_cidrs=policy.allow_cidrs,
            static_resolve=config.resolve,
            listeners=[(config.listen.host, config.listen.port), (config.admin.host, config.admin.port),
                       *[(host, config.listen.transparent_port or 0) for host in ("127.0.0.1", "::1")]],
            local_addresses=local_addresses() if local is None else local,
            metadata=policy.metadata,
        )

    def add_listener(self, host: str, port: int) -> None:
        """Deny `host:port` as a destination: the sidecar's own listener, under any spelling.

        Call again with the real port after binding port 0.
        """
        if port == 0:
            return
        address: IPAddress
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            # A name (`localhost`, a pod host name): loopback is always covered; treat the
            # rest like a wildcard bind, so every local address on that port is denied.
            address = _WILDCARDS[0]
        self._listeners.add((address, port))
        self._decide.cache_clear()

    # --- the pure, per-request check -------------------------------------------------------

    def check_target(self, target: _HasTarget) -> str | None:
        """Raise PolicyDenied if the request's destination is refused; pure, no I/O.

        Returns None, or in report mode the reason the host rules would have refused it.
        """
        return self.check_host(target.host, target.port, routed=target.route is not None)

    def check_identity(self, target: _HasTarget, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """`policy.metadata: identity`, for a target whose host is in `identity_hosts`: only the
        workload's own credential exchanges pass (metadata.py); the rest is denied_ip/metadata."""
        why = metadata_module.identity_refusal(target.host, target.port, method, path, headers)
        if why is not None:
            raise PolicyDenied("denied_ip", "metadata", target.host, why=why)


    def check_host(self, host: str, port: int, *, routed: bool = False) -> str | None:
        """`check_target` for a bare host and port (a tunnel's destination, say)."""
        decision = self._decide(host, port, routed)
        if decision is None:
            return None
        kind, reason, address = decision
        if kind is None:
            return reason
        raise PolicyDenied(kind, reason, host, address)

    def _decide_uncached(self, host: str, port: int, routed: bool) -> Decision | None:
        try:
            canonical = canonical_host(host)
        except ValueError:
            return ("denied_host", "invalid_host", None)
        literal = _literal(canonical)
        if literal is not None:
            reason = self.address_reason(literal, port)
            if reason is not None:
                return ("denied_ip", reason, str(literal))
            if routed:
                return None
            return self._host_decision(self._host_reason(canonical, literal))
        # Host rules apply to forward-proxy destinations; a route's upstream is allowed by
        # being configured. Address rules apply to both, and come first in report mode too.
        host_reason = None if routed else self._host_reason(canonical, None)
        if host_reason is not None and self.mode == "enforce":
            return ("denied_host", host_reason, None)
        for address in self._static.get(canonical, ()):
            reason = self.address_reason(address, port)
            if reason is not None:
                return ("denied_ip", reason, str(address))
        return self._host_decision(host_reason)

    def _host_reason(self, canonical: str, literal: IPAddress | None) -> str | None:
        """Why the host rules refuse a (forward-proxy) destination: host_denied, not_allowed, or None."""
        if self._deny.matches(canonical):
            return "host_denied"
        if self.default == "deny" and not (
            self._allow.matches(canonical) or (literal is not None and in_networks(literal, self._allow_cidrs))
        ):
            return "not_allowed"
        return None

    def _host_decision(self, reason: str | None) -> Decision | None:
        """A host-rule refusal as a decision: a denial when enforcing, a would-deny when reporting."""
        if reason is None:
            return None
        return (None if self.mode == "report" else "denied_host", reason, None)

    def address_reason(self, address: IPAddress, port: int) -> str | None:
        """Why a connection to `address:port` is refused, or None: listener, then ranges."""
        if self._is_listener(address, port):
            return "listener"
        if in_networks(address, self._allow_cidrs):
            return None
        return denial_reason(address)

    def _is_listener(self, address: IPAddress, port: int) -> bool:
        for effective in effective_addresses(address):
            for bound, bound_port in self._listeners:
                if port != bound_port:
                    continue
                if effective == bound or effective.is_loopback or effective in _WILDCARDS:
                    return True
                if bound in _WILDCARDS and effective in self._local:
                    return True
        return False

    # --- the connect guard -----------------------------------------------------------------

    async def resolve(self, host: str, port: int) -> list[str]:
        """The checked addresses to connect to for `host:port`; raise PolicyDenied if ANY is denied.

        Static `resolve:` entries first, then the system resolver (`loop.getaddrinfo`).
        A resolver failure raises NameNotResolved (an OSError); the transport maps it to a
        connect error whose body names the name.
        """
        try:
            canonical = canonical_host(host)
        except ValueError:
            raise PolicyDenied("denied_host", "invalid_host", host) from None
        literal = _literal(canonical)
        identity = canonical in self.identity_hosts and port == metadata_module.IDENTITY_PORT
        if identity and literal is not None:
            return [str(literal)]  # only requests check_identity passed reach this pool
        if literal is not None:
            addresses: Sequence[IPAddress] = (literal,)
        elif canonical in self._static:
            addresses = self._static[canonical]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    canonical, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except socket.gaierror as exc:
                raise NameNotResolved(canonical, exc) from exc
            found: dict[IPAddress, None] = {}
            for _family, _type, _proto, _name, sockaddr in infos:
                found[ipaddress.ip_address(sockaddr[0])] = None
            addresses = tuple(found)
        for address in addresses:
            if identity and str(address) in metadata_module.METADATA_ADDRESSES:
                continue  # metadata.google.internal: only to the metadata address itself
            reason = self.address_reason(address, port)
            if reason is not None:
                raise PolicyDenied("denied_ip", reason, host, str(address))
        return [str(address) for address in addresses]


def _literal(canonical: str) -> IPAddress | None:
    # canonical_host renders addresses in their compressed form: only those contain ':' or
    # consist of digits and dots.
    if ":" in canonical or canonical.replace(".", "").isdigit():
        return ipaddress.ip_address(canonical)
    return None


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]  # room for sockaddr_in6


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.POINTER(_SockAddr)),
    ("data", ctypes.c_void_p),
]


def _libc() -> ctypes.CDLL:
    """The C library: the process's own symbols first (dlopen(NULL): the interpreter links libc,
    glibc or musl), then a library search, which runs `ldconfig -p` (~5 ms at every start)."""
    process = ctypes.CDLL(None, use_errno=True)
    if hasattr(process, "getifaddrs") and hasattr(process, "freeifaddrs"):
        return process
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _interface_addresses() -> set[IPAddress]:
    """Every address of every interface, secondary ones included (libc getifaddrs)."""
    libc = _libc()
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: set[IPAddress] = set()
    try:
        node = head
        while node:
            entry = node.contents
            if entry.addr:
                family, data = entry.addr.contents.family, bytes(entry.addr.contents.data)
                if family == socket.AF_INET:
                    found.add(ipaddress.IPv4Address(data[2:6]))  # after the port
                elif family == socket.AF_INET6:
                    found.add(ipaddress.IPv6Address(data[6:22]))  # after port and flow info
            node = entry.next
    finally:
        libc.freeifaddrs(head)
    return found


def local_addresses() -> frozenset[IPAddress]:
    """This host's own addresses, so a wildcard listener is denied by pod IP (or any other) too."""
    found: set[IPAddress] = set()
    try:
        found |= _interface_addresses()
    except (OSError, AttributeError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(ipaddress.ip_address(info[4][0]))
    except (OSError, ValueError):
        pass
    return frozenset(found)


def exposure_warnings(config: Config) -> list[str]:
    """Start-up warnings for settings that weaken the sidecar's guarantees (logged at start).

    (A route with `tls.insecure_skip_verify` is warned about where its pool is built, in
    sidecar.upstream.client.)
    """
    warnings: list[str] = []
    if config.listen.allow_non_loopback and not is_loopback_host(config.listen.host):
        warnings.append(
            f"data listener bound to {config.listen.host}:{config.listen.port} beyond loopback "
            "(listen.allow_non_loopback): other pods can use this sidecar as a proxy"
        )
    return warnings


