"""Where a request goes: ASGI scope -> Target. Pure: no I/O, no policy.

Two ways an app addresses the sidecar (DESIGN.md "How the app addresses the sidecar"):
- forward-proxy form: `GET http://api.example.com/x` with HTTP_PROXY set. The absolute URI is
  in `raw_path` under both parsers (h11 keeps it; uvicorn's httptools protocol drops it, and
  the sidecar's subclass, limits.py, puts it back), so its authority decides the destination
  and the upstream Host, never the Host header (RFC 9112 3.2.2). The sidecar originates TLS: http://host/ is
  sent to https://host/ (port 80 or none becomes 443, an explicit other port is kept), unless
  the host is listed in `policy.plain_http_hosts`.
- named routes: a request whose Host is the sidecar itself and whose path starts with a route
  prefix goes to that route's upstream, the rest of the raw path and the query appended as sent.
A destination that is the sidecar's own listener is a loop (508), never forwarded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar._compat.httpx import raw_url
from sidecar.config import Config, Route, Timeouts
from sidecar.errors import EgressError
from sidecar.policy.hostnames import HostPatterns, canonical_host, endpoint

DEFAULT_PORTS = {"http": 80, "https": 443}
# A host as it may appear in Host or an absolute URI: a DNS-ish name or an IPv4 literal in any
# spelling the policy later normalises, or a bracketed IPv6 literal.
_HOST_RE = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_.-]{0,252})|\[[0-9a-f:.%a-z]+\])$")
# Scope key the intercepting protocol sets: the CONNECT authority (`host:port`) of the tunnel
# whose decrypted requests the scope carries (sidecar/intercept/interceptor.py).
INTERCEPTED = "egress.intercepted"
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "localhost.", "0.0.0.0", "[::]"})


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A route built once from config; the hot path only reads attributes."""

    name: str
    prefix: bytes
    scheme: str
    host: str
    port: int
    base_path: str
    host_header: bytes
    timeouts: dict[str, float | None]
    config: Route
    # (lower-case name, value provider) pairs the route injects upstream.
    injected_headers: tuple[tuple[bytes, Any], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes."""

    route: CompiledRoute | None
    scheme: str
    host: str  # lower-case, no brackets for IPv6, no trailing dot
    port: int
    path: str  # raw path as sent (ASCII), base path of the route prepended
    query: str | None
    host_header: bytes

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """`host:port` as labels and log lines show it: `[::1]:8443`, not the ambiguous `::1:8443`."""
        return endpoint(self.host, self.port)

    def url(self) -> httpx.URL:
        """The URL handed to httpx: the app's raw path and query exactly as sent, nothing
        re-parsed or re-quoted (httpx would percent-encode some bytes)."""
        port = None if self.port == DEFAULT_PORTS[self.scheme] else self.port
        return raw_url(self.scheme, self.host, port, self.path, self.query)


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host[:port]` -> (host, port). Raises ValueError on a malformed authority."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("unclosed IPv6 literal")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("junk after IPv6 literal")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.partition(":")
    if "@" in host:
        raise ValueError("userinfo is not allowed in the authority")
    if port_text == "":
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def normalise_host(host: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode a Unicode name. Raises ValueError."""
    host = host.strip().lower()
    if host.endswith(".") and not host.startswith("["):
        host = host[:-1]
    if not host:
        raise ValueError("empty host")
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    if not _HOST_RE.match(host if ":" not in host or host.startswith("[") else f"[{host}]"):
        raise ValueError(f"invalid host {host!r}")
    return host.strip("[]")


def _timeouts(global_timeouts: Timeouts, route: Route | None) -> dict[str, float | None]:
    values: dict[str, float | None] = {
        "connect": float(global_timeouts.connect),
        "read": float(global_timeouts.read),
        "write": float(global_timeouts.write),
        "pool": float(global_timeouts.pool),
    }
    if route is not None:
        for key in values:
            override = getattr(route.timeouts, key)
            if override is not None:
                values[key] = float(override)
    return values


def compile_route(route: Route, config: Config, injected: tuple[tuple[bytes, Any], ...] = ()) -> CompiledRoute:
    if route.upstream is None:
        # A match_hosts-only route goes wherever the app asked; its first pattern names it where an
        # upstream is expected (the circuit breaker's key, `*.example.com:443`). No prefix.
        shown = route.match_hosts[0].strip().lower()
        return CompiledRoute(
            name=route.name, prefix=b"", scheme="https", host=shown, port=DEFAULT_PORTS["https"],
            base_path="", host_header=shown.encode(), timeouts=_timeouts(config.timeouts, route),
            config=route, injected_headers=injected,
        )
    assert route.prefix is not None  # config.check_semantics: prefix and upstream go together
    scheme, _, rest = route.upstream.partition("://")
    authority, slash, base_path = rest.partition("/")
    host, port = split_authority(authority)
    host = normalise_host(host)
    port = port or DEFAULT_PORTS[scheme]
    base = ("/" + base_path).rstrip("/") if slash else ""
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == DEFAULT_PORTS[scheme] else f"{shown_host}:{port}"
    return CompiledRoute(
        name=route.name,
        prefix=route.prefix.rstrip("/").encode(),
        scheme=scheme,
        host=host,
        port=port,
        base_path=base,
        host_header=host_header.encode(),
        timeouts=_timeouts(config.timeouts, route),
        config=route,
        injected_headers=injected,
    )


class Router:
    """Resolves ASGI scopes to Targets with tables built once from config."""

    def __init__(self, config: Config, routes: Iterable[CompiledRoute]) -> None:
        routes = list(routes)
        # Longest prefix first, so /api/v2 wins over /api.
        self.routes = sorted((r for r in routes if r.prefix), key=lambda r: len(r.prefix), reverse=True)
        # Routes whose settings apply to forwarded requests by destination host, first match wins.
        self.host_routes = tuple(
            (HostPatterns(r.config.match_hosts), r) for r in routes if r.config.match_hosts
        )
        # Bounded, so a stream of random names cannot grow memory.
        self._route_for_host = functools.lru_cache(maxsize=4096)(self._route_for_host_uncached)
        self._intercepted = functools.lru_cache(maxsize=4096)(self._intercepted_uncached)
        self.default_timeouts = _timeouts(config.timeouts, None)
        # Exact names or *.suffix, matched like the policy's host lists.
        self.plain_http_hosts = HostPatterns(config.policy.plain_http_hosts)
        own_ports = {config.listen.port, config.admin.port, config.listen.transparent_port or config.listen.port}
        own_hosts = set(_LOOPBACK_NAMES) | {config.listen.host.lower(), config.admin.host.lower()}
        self.own_ports = frozenset(own_ports)
        self.own_hosts = frozenset(h.strip("[]") for h in own_hosts)
        self.listen_port = config.listen.port

    def is_self(self, host: str, port: int) -> bool:
        """Whether host:port is one of the sidecar's own listeners (by name or loopback literal)."""
        return port in self.own_ports and (host in self.own_hosts or host.startswith("127."))

    def resolve(self, scope: Mapping[str, Any]) -> Target:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
        query_bytes: bytes = scope.get("query_string", b"")
        if not raw_path.isascii() or not query_bytes.isascii():
            raise EgressError("bad_request", "non-ASCII bytes in the request target")
        query = query_bytes.decode("ascii") if query_bytes else None
        intercepted = scope.get(INTERCEPTED)
        if intercepted is not None:
            if not raw_path.startswith(b"/"):
                raise EgressError("bad_request", "an intercepted request must be origin-form")
            return self.intercepted_target(intercepted, raw_path, query)
        # h11 keeps the absolute URI in raw_path; httptools keeps only the path.
        lowered = raw_path[:8].lower()
        if lowered.startswith((b"http://", b"https://")):
            _, _, rest = raw_path.partition(b"://")
            authority, _, path = rest.partition(b"/")
            return self._forward_target(authority.decode("ascii"), "/" + path.decode("ascii"), query)
        if not raw_path.startswith(b"/"):
            raise EgressError("bad_request", "request target must be an absolute path or absolute URI")
        host_value = _header(scope, b"host")
        if host_value is None:
            return self._route_target(raw_path, query)
        try:
            host, port = split_authority(host_value.decode("ascii"))
            host = normalise_host(host)
        except (ValueError, UnicodeError) as exc:
            raise EgressError("bad_request", f"bad Host header: {exc}") from None
        if port is None:
            port = 80
        if host in self.own_hosts or host.startswith("127."):
            if port == self.listen_port:
                return self._route_target(raw_path, query)
            if port in self.own_ports:
                raise EgressError("loop", f"{host}:{port} is the sidecar's own listener")
        return self._forward_target(host_value.decode("ascii"), raw_path.decode("ascii"), query)

    def _route_target(self, raw_path: bytes, query: str | None) -> Target:
        for route in self.routes:
            prefix = route.prefix
            if raw_path.startswith(prefix) and (len(raw_path) == len(prefix) or raw_path[len(prefix)] in b"/"):
                rest = raw_path[len(prefix) :].decode("ascii")
                path = route.base_path + rest if rest else (route.base_path or "/")
                if self.is_self(route.host, route.port):
                    raise EgressError("loop", f"route {route.name} points at the sidecar itself")
                return Target(route, route.scheme, route.host, route.port, path, query, route.host_header)
        raise EgressError("no_route", f"no route prefix matches {raw_path[:100]!r}")

    def _is_plain(self, host: str) -> bool:
        if not self.plain_http_hosts:
            return False
        try:
            return self.plain_http_hosts.matches(canonical_host(host))
        except ValueError:
            return False  # not a valid host: the policy denies it as invalid_host

    def _route_for_host_uncached(self, host: str) -> CompiledRoute | None:
        try:
            canonical = canonical_host(host)
        except ValueError:
            return None  # not a valid host: the policy denies it as invalid_host
        for patterns, route in self.host_routes:
            if patterns.matches(canonical):
                return route
        return None

    def intercepted_target(self, authority: str, path: bytes, query: str | None) -> Target:
        """The Target of a request decrypted inside a CONNECT tunnel: https to the tunnel's
        authority (never the inner Host header: no fronting past the CONNECT check)."""
        route, host, port, host_header = self._intercepted(authority)
        return Target(route, "https", host, port, path.decode("ascii"), query, host_header)

    def _intercepted_uncached(self, authority: str) -> tuple[CompiledRoute | None, str, int, bytes]:
        # Per tunnel authority, not per request (cached in __init__): the tunnel checked it already.
        host, port = split_authority(authority)
        host = normalise_host(host)
        port = port or DEFAULT_PORTS["https"]
        route = self._route_for_host(host) if self.host_routes else None
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == DEFAULT_PORTS["https"] else f"{shown}:{port}"
        return route, host, port, host_header.encode("ascii")

    def _forward_target(self, authority: str, path: str, query: str | None) -> Target:
        try:
            host, port = split_authority(authority)
            host = normalise_host(host)
        except (ValueError, UnicodeError) as exc:
            raise EgressError("bad_request", f"bad destination: {exc}") from None
        route = self._route_for_host(host) if self.host_routes else None
        if self._is_plain(host):
            scheme, port = "http", port or 80
        else:
            scheme = "https"
            port = 443 if port in (None, 80) else port
        if self.is_self(host, port):
            raise EgressError("loop", f"{host}:{port} is the sidecar's own listener")
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
        return Target(route, scheme, host, port, path, query, host_header.encode("ascii"))


def _header(scope: Mapping[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None
