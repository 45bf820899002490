"""The transparent listener: connections the egress lock redirected, decided like any other request.

Each connection on `listen.transparent_port` (127.0.0.1 and ::1) is read for its original
destination (capture.original_destination, once per connection) and its first bytes:
- plain HTTP: served by the data listener's own protocol and ForwardApp; the scope's `server`
  is the original destination, and the Host header decides (capture.captured_target), then
  the same policy, resilience and pooled client as forward-proxy requests;
- TLS: handed to `tls_handler` (captured_tls.py: SNI checked against the original destination,
  then the CONNECT tunnel) when one is given; without one, refused like anything else;
- anything else: refused (the connection is closed), logged with the original destination
  and counted as `unsupported`.
A connection whose original destination is one of the sidecar's own listeners (or that was
not redirected at all, so it was aimed at this listener) is the `loop` case.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import time
from collections.abc import Callable

from sidecar.errors import ERRORS, EgressError
from sidecar.exchange import Exchange
from sidecar.ingress import capture
from sidecar.ingress.protocol import LimitedHttpToolsProtocol
from sidecar.observe.observer import Observer
from sidecar.policy.hostnames import HostPatterns
from sidecar.proxy.app import ForwardApp, Scope
from sidecar.proxy.routing import Target
from sidecar.runtime import Runtime

# (protocol's transport, original destination, first bytes): takes the connection over.
TLSHandler = Callable[[asyncio.Transport, capture.Address, bytes], None]
_SNIFF_LIMIT = 64  # capture.first_bytes_kind decides within this many bytes


class CapturedResolver:
    """ForwardApp's `resolve` for captured requests: scope (server = original destination) -> Target."""

    def __init__(self, runtime: Runtime) -> None:
        policy = runtime.policy
        self._originate = HostPatterns(list(runtime.config.lock.originate_tls_hosts))

        def is_listener(address: str, port: int) -> bool:
            return policy.address_reason(ipaddress.ip_address(address), port) == "listener"

        # Per request, the same few original destinations: a bounded cache. Requests start only
        # after every listener (port 0 included) has been added to the policy.
        self._is_listener = functools.lru_cache(maxsize=1024)(is_listener)

    def __call__(self, scope: Scope) -> Target:
        original: capture.Address = scope["server"]
        if self._is_listener(original[0], original[1]):
            raise EgressError("loop", f"captured connection to {original[0]}:{original[1]}, the sidecar's own listener")
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
        return capture.captured_target(scope["headers"], raw_path, scope.get("query_string", b""), original,
                                       self._originate)


def transparent_app(runtime: Runtime) -> ForwardApp:
    """The ASGI app of the transparent listener: ForwardApp with the captured resolver."""
    return ForwardApp(runtime, resolve=CapturedResolver(runtime))


def refusal_reporter(observer: Observer) -> Callable[..., None]:
    """Report a refused captured connection: one access-log line and `egress_errors_total{kind}`
    (and `egress_denied_total{reason}` when a policy reason is given)."""

    def report(kind: str, original: capture.Address, detail: str, reason: str | None = None) -> None:
        exchange = Exchange(start=time.perf_counter(), method="-", path="-")
        host = f"[{original[0]}]" if ":" in original[0] else original[0]
        exchange.upstream = f"{host}:{original[1]}"
        exchange.kind, exchange.status, exchange.detail = kind, ERRORS[kind].status, detail
        exchange.reason = reason
        observer.started(exchange)
        exchange.end = time.perf_counter()
        observer.finished(exchange)

    return report


class CapturedProtocolMixin:
    """Before the HTTP protocol sees a byte: the original destination and what the first bytes are."""

    report: Callable[..., None]
    tls_handler: TLSHandler | None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        sock = transport.get_extra_info("socket")
        original = capture.original_destination(sock) if sock is not None else None
        if original is not None:
            self.server = original  # uvicorn puts this in the scope as `server`
        self._sniffed: bytes | None = b""  # None once decided

    def data_received(self, data: bytes) -> None:
        sniffed = self._sniffed
        if sniffed is None:
            super().data_received(data)  # type: ignore[misc]
            return
        data = sniffed + data
        kind = capture.first_bytes_kind(data[:_SNIFF_LIMIT])
        if kind is None:
            self._sniffed = data
            return
        self._sniffed = None
        if kind == "http":
            super().data_received(data)  # type: ignore[misc]
            return
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        original: capture.Address = self.server
        if kind == "tls" and self.tls_handler is not None:
            self._cancel_head_timer()  # type: ignore[attr-defined]
            self.connections.discard(self)  # type: ignore[attr-defined]  # no longer uvicorn's to close
            self.tls_handler(transport, original, data)
            return
        self._cancel_head_timer()  # type: ignore[attr-defined]
        transport.abort()
        what = "TLS (no tunnel handler)" if kind == "tls" else f"neither HTTP nor TLS (first bytes {data[:8]!r})"
        self.report("unsupported", original, f"captured connection to {original[0]}:{original[1]} refused: {what}")


    def _head_timed_out(self) -> None:
        if self._sniffed is None:
            super()._head_timed_out()  # type: ignore[misc]
            return
        # Nothing decided yet: no bytes, or too few. A protocol where the server speaks first
        # (SMTP, MySQL) ends here: closed without an answer, logged with where it was going.
        self._head_timer = None
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if transport.is_closing():
            return
        transport.abort()
        original: capture.Address = self.server
        timeout = self.limits.header_timeout  # type: ignore[attr-defined]
        self.report("client_timeout", original, f"captured connection to {original[0]}:{original[1]} sent "
                    f"{len(self._sniffed)} bytes in {timeout:g}s (a protocol where the server speaks first?)")


def protocol_class(
    base: type[LimitedHttpToolsProtocol], observer: Observer, tls_handler: TLSHandler | None = None
) -> type[LimitedHttpToolsProtocol]:
    """The data listener's protocol class with the capture step in front."""
    return type("CapturedProtocol", (CapturedProtocolMixin, base),
                {"report": staticmethod(refusal_reporter(observer)), "tls_handler": staticmethod(tls_handler)
                 if tls_handler is not None else None})


def listening_sockets(port: int) -> list[socket.socket]:
    """TCP sockets on 127.0.0.1:port and [::1]:port (the latter skipped when the pod has no IPv6).

    Where the lock's REDIRECT sends IPv4 and IPv6 connections respectively. Port 0 (tests):
    IPv6 on the port IPv4 got, tried again with another port should that one be taken on ::1.
    """
    for _attempt in range(5 if port == 0 else 1):
        try:
            return _bind_both(port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE:
                raise
    return _bind_both(port)


def _bind_both(port: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port or (sockets[0].getsockname()[1] if sockets else 0)))
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue  # no IPv6 in this pod
            for bound in sockets:
                bound.close()
            raise
        sock.listen(2048)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
