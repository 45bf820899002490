"""Captured TLS (the egress lock): a redirected connection whose first bytes are a TLS handshake.

The decision, before anything is dialled:
1. the ClientHello is read whole (sni.parse_client_hello; bounded by its size limit and
   `limits.header_timeout`);
2. with a server name: the name is what host rules check, and it must resolve (DNS, or the
   static `resolve:` map, every answer checked by the address rules) to the very address the
   app dialled: an app cannot reach 10.0.0.1 by naming an allowed host in its SNI
   (`sni_mismatch`). Without one: the dialled address is the host, and the address rules and
   `policy.default` alone decide (an IP literal, as for CONNECT);
3. then the CONNECT tunnel (tunnel.Tunnels.open, source "transparent") to exactly the dialled
   address: the same connect_ports, host and address rules, max_tunnels, SNI check, splice,
   metrics and log lines as CONNECT.
Refusals close the connection (TLS has no room for an HTTP answer), with a log line and a metric.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from sidecar.errors import EgressError, classify
from sidecar.policy.egress import EgressPolicy, PolicyDenied
from sidecar.policy.hostnames import canonical_host
from sidecar.tunnel.sni import ClientHello, Incomplete, parse_client_hello
from sidecar.tunnel.tunnels import Tunnels

# (kind, original destination, detail, reason): one log line and metric per refusal.
Report = Callable[[str, tuple[str, int], str, "str | None"], None]


class CapturedTLS:
    """Takes over captured TLS connections from the transparent listener's protocol."""

    def __init__(self, tunnels: Tunnels, policy: EgressPolicy, hello_timeout: float, report: Report) -> None:
        self.tunnels = tunnels  # `policy` is the tunnels' own: the active one after a config reload
        self.hello_timeout = hello_timeout
        self.report = report

    @property
    def policy(self) -> EgressPolicy:
        return self.tunnels.policy

    def take(self, transport: asyncio.Transport, original: tuple[str, int], first: bytes) -> None:
        _HelloReader(self, transport, original, first)

    async def decide(self, transport: asyncio.Transport, original: tuple[str, int], data: bytes,
                     hello: ClientHello) -> None:
        address, port = original
        try:
            if hello.sni is None:
                host = address  # an IP literal: address rules and policy.default decide
            else:
                try:
                    host = canonical_host(hello.sni)
                except ValueError:
                    raise PolicyDenied("denied_host", "invalid_host", hello.sni[:100]) from None
                self.policy.check_host(host, port)  # host rules first: no DNS for a denied name
                try:
                    async with asyncio.timeout(self.hello_timeout):  # no extra task, unlike wait_for
                        resolved = await self.policy.resolve(host, port)
                except (OSError, TimeoutError) as exc:
                    raise _Mismatch(f"server name {host!r} does not resolve ({exc}); dialled {address}") from None
                dialled = ipaddress.ip_address(address)
                if dialled not in {ipaddress.ip_address(a) for a in resolved}:
                    raise _Mismatch(f"server name {host!r} resolves to {', '.join(resolved[:4])}, "
                                    f"not to the dialled {address}")
        except (EgressError, _Mismatch) as exc:
            transport.abort()
            if isinstance(exc, _Mismatch):
                self.report("denied_host", original, f"sni_mismatch: {exc}", "sni_mismatch")
            else:
                reason = exc.reason if isinstance(exc, PolicyDenied) else None
                self.report(classify(exc), original, str(exc), reason)
            return
        if transport.is_closing():
            return
        transport.resume_reading()
        self.tunnels.open(transport, host, port, data, addresses=[address], source="transparent")


class _Mismatch(Exception):
    """The server name does not lead to the dialled address."""


class _HelloReader(asyncio.Protocol):
    """The connection's protocol until the ClientHello is whole and decided."""

    def __init__(self, owner: CapturedTLS, transport: asyncio.Transport, original: tuple[str, int],
                 first: bytes) -> None:
        self.owner = owner
        self.transport = transport
        self.original = original
        self.buffer = bytearray(first)
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(owner.hello_timeout, self._timed_out)
        self.task: asyncio.Task[None] | None = None
        transport.set_protocol(self)
        self._check()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._check()

    def eof_received(self) -> bool:
        if self.task is None:
            self._refuse("client_timeout", "the client closed before its ClientHello was complete")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _check(self) -> None:
        parsed = parse_client_hello(bytes(self.buffer))
        if isinstance(parsed, Incomplete):
            return
        if not isinstance(parsed, ClientHello):
            self._refuse("unsupported", f"captured TLS without a valid ClientHello: {parsed.detail}")
            return
        self._stop_timer()
        self.transport.pause_reading()  # the tunnel resumes once it owns the connection
        self.task = self.loop.create_task(
            self.owner.decide(self.transport, self.original, bytes(self.buffer), parsed))

    def _timed_out(self) -> None:
        self.timer = None
        if self.task is None:
            self._refuse("client_timeout", f"no complete ClientHello in {self.owner.hello_timeout:g}s")

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _refuse(self, kind: str, detail: str) -> None:
        self._stop_timer()
        self.transport.abort()
        self.owner.report(kind, self.original, detail, None)
