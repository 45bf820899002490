"""One tunnel's bytes: the client and upstream connections as two asyncio protocols.

The state machine of a tunnel once its checks before connecting passed (tunnel.py owns those
and the API): connect to a checked address, write the answer, check the first client bytes
(ClientHello, SNI), then relay both ways:

    CONNECTING --connected, answer written--> HELLO --checked--> SPLICE --both EOFs, error--> DONE
    CONNECTING --failed--> DONE (error answer: owner.refused)
    HELLO --refused, timed out--> DONE (both closed, nothing forwarded)

Back-pressure: each side's transport has a 256 KiB / 64 KiB write-buffer mark; past it, the
transport calls `pause_writing` on its protocol, which stops reading the OTHER side (and
`resume_writing` resumes it), so a tunnel holds at most about two write buffers whatever the
speed of either peer. Half-closes: an EOF from one side is `write_eof` on the other; the
tunnel ends when both sides have sent theirs. `timeouts.tunnel_idle` is checked by a timer
every quarter of it against the byte counts (no per-chunk clock reads).

References: the tunnel holds both transports and each transport holds its protocol, which
holds the tunnel; `finish` drops the tunnel's side of each, so nothing is left for the cyclic
collector (gc is frozen; the data path makes no cycles).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sidecar.config import Config
from sidecar.errors import TUNNEL_REFUSALS
from sidecar.exchange import Exchange, TunnelRecord
from sidecar.policy.addresses import parse_ip_literal
from sidecar.policy.egress import PolicyDenied
from sidecar.tunnel.sni import MAX_HELLO_BYTES, ClientHello, Incomplete, names_match, parse_client_hello
from sidecar.upstream.transport.connect import dial

if TYPE_CHECKING:
    from sidecar.observe.observer import Observer
    from sidecar.policy.egress import EgressPolicy

# Per direction: past this many bytes waiting in one side's write buffer, the other side's
# reads stop until it drains below the low mark. Bounds a tunnel's memory (two buffers).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_IDLE_CHECKS = 4  # the idle timer looks every tunnel_idle/4: closed within 1.25 x tunnel_idle

# Outcomes that are policy refusals after the 200: also counted in egress_denied_total{reason}.
REFUSALS = TUNNEL_REFUSALS

_now = time.perf_counter
_CONNECTING, _HELLO, _SPLICE, _DONE = range(4)


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    """What tunnels read from config, as plain numbers (built once)."""

    connect_ports: frozenset[int]
    plaintext: bool
    idle_timeout: float
    hello_timeout: float
    connect_timeout: float
    max_tunnels: int

    @classmethod
    def from_config(cls, config: Config) -> TunnelSettings:
        return cls(
            connect_ports=frozenset(config.policy.connect_ports),
            plaintext=config.policy.connect_plaintext,
            idle_timeout=float(config.timeouts.tunnel_idle),
            hello_timeout=float(config.limits.header_timeout),
            connect_timeout=float(config.timeouts.connect),
            max_tunnels=config.limits.max_tunnels,
        )



Intercept = Callable[["TunnelRecord", asyncio.Transport, bytes], bool]


class Owner(Protocol):
    """What a tunnel needs from whoever opened it (tunnel.Tunnels)."""

    settings: TunnelSettings
    policy: EgressPolicy
    observer: Observer
    intercept: Intercept | None

    def refused(self, client: asyncio.Transport, start: float, target: str, upstream: str,
                exc: BaseException, *, answer: bool, method: str = "CONNECT") -> None: ...

    def closed(self, tunnel: Tunnel, established: bool) -> None: ...


def _is_literal(host: str) -> bool:
    try:
        return parse_ip_literal(host) is not None
    except ValueError:
        return False


class _UpstreamSide(asyncio.Protocol):
    """The upstream connection's protocol: hands everything to its tunnel."""

    __slots__ = ("tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel: Tunnel | None = tunnel

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.from_upstream(data)

    def eof_received(self) -> bool:
        tunnel = self.tunnel
        return tunnel.upstream_eof() if tunnel is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.upstream_lost(exc)

    def pause_writing(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.client is not None:
            tunnel.client.pause_reading()

    def resume_writing(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.client is not None:
            tunnel.client.resume_reading()


class Tunnel(asyncio.Protocol):
    """One tunnel; the client connection's protocol from the CONNECT on (module doc)."""

    def __init__(self, tunnels: Owner, client: asyncio.Transport, record: TunnelRecord, buffered: bytes,
                 established: bytes | None, check_sni: bool, target: str) -> None:
        self.tunnels = tunnels
        self.client: asyncio.Transport | None = client
        self.upstream: asyncio.Transport | None = None
        self.record = record
        self._target = target
        self._method = "CONNECT" if record.source == "connect" else record.source  # for error lines
        self._side: _UpstreamSide | None = None
        self._buffer = bytearray(buffered)  # client bytes not yet forwarded (until the splice)
        self._pending: list[bytes] = []  # upstream bytes before the splice
        self._established = established
        self._check_sni = check_sni
        self._need = 1  # buffered bytes the ClientHello check waits for (sni.Incomplete.need)
        self._state = _CONNECTING
        self._client_eof = False
        self._upstream_eof = False
        self._up = 0
        self._down = 0
        self._seen = 0
        self._quiet = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        client.set_protocol(self)

    # -- setting up ------------------------------------------------------------------------
    def begin(self, addresses: Sequence[str] | None) -> None:
        if len(self._buffer) > MAX_HELLO_BYTES:
            self.client.pause_reading()  # type: ignore[union-attr]
        self._task = self._loop.create_task(self._open(addresses))

    async def _open(self, addresses: Sequence[str] | None) -> None:
        tunnels = self.tunnels
        record = self.record
        policy = tunnels.policy

        async def checked(host: str, port: int) -> Sequence[str]:
            assert addresses is not None
            for address in addresses:
                reason = policy.address_reason(ipaddress.ip_address(address.strip("[]")), port)
                if reason is not None:
                    raise PolicyDenied("denied_ip", reason, host, address)
            return addresses

        record.connect_start = _now()
        try:
            transport, address = await dial(
                self._loop, self._upstream_protocol, record.host, record.port,
                policy.resolve if addresses is None else checked, tunnels.settings.connect_timeout,
            )
        except asyncio.CancelledError:
            return  # the client went away while connecting (finish() cancelled us)
        except Exception as exc:  # noqa: BLE001 - every failure before the 200 is an error answer
            self._fail_before(exc)
            return
        record.connect_end = _now()
        record.address = address
        client = self.client
        if self._state is _DONE or client is None:
            transport.close()
            return
        self.upstream = transport
        if self._pending:
            transport.pause_reading()
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        client.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self._established is not None:
            client.write(self._established)
        if self._pending and tunnels.settings.plaintext:
            for chunk in self._pending:  # a server-first greeting that came with the connect
                client.write(chunk)
                self._down += len(chunk)
            self._pending = []
            transport.resume_reading()
        self._state = _HELLO
        self._timer = self._loop.call_later(tunnels.settings.hello_timeout, self._hello_timed_out)
        client.resume_reading()
        self._check_hello()

    def _upstream_protocol(self) -> asyncio.Protocol:
        self._side = _UpstreamSide(self)
        return self._side

    def _fail_before(self, exc: BaseException) -> None:
        client = self.client
        self._state = _DONE
        self._release(established=False)
        if client is not None:
            self.tunnels.refused(client, self.record.start, self._target, self.record.upstream, exc,
                                 answer=self._established is not None, method=self._method)

    # -- the first client bytes ------------------------------------------------------------
    def _check_hello(self) -> None:
        if len(self._buffer) < self._need and not self._client_eof:
            return  # the record under way is not complete: nothing new to parse
        parsed = parse_client_hello(bytes(self._buffer), MAX_HELLO_BYTES)
        if isinstance(parsed, Incomplete):
            if self._client_eof:
                self.finish("bad_hello", "the client closed before its ClientHello was complete")
            else:
                self._need = parsed.need
            return
        if not isinstance(parsed, ClientHello):
            if parsed.reason == "not_tls" and self.tunnels.settings.plaintext:
                self._splice()
            else:
                self.finish(parsed.reason, parsed.detail)
            return
        record = self.record
        record.sni = sni = parsed.sni
        if self._check_sni:
            if sni is None:
                if not _is_literal(record.host):
                    self.finish("no_sni", f"no server name in the ClientHello for {record.host}")
                    return
            elif not names_match(sni, record.host):
                self.finish("sni_mismatch", f"server name {sni[:100]!r} is not {record.host}")
                return
        hook = self.tunnels.intercept
        if hook is not None and self.client is not None:
            try:
                taken = hook(record, self.client, bytes(self._buffer))
            except Exception as exc:  # noqa: BLE001 - a failing hook ends this tunnel, not the listener
                self.finish("intercept_error", f"{type(exc).__name__}: {exc}")
                return
            if taken:
                self.client = None  # the hook owns it now: not closed here
                self.finish("intercepted")
                return
        self._splice()

    def _hello_timed_out(self) -> None:
        self._timer = None
        if self._state is _HELLO:
            self.finish("client_timeout", f"no ClientHello within {self.tunnels.settings.hello_timeout:g}s")

    # -- splicing --------------------------------------------------------------------------
    def _splice(self) -> None:
        client, upstream = self.client, self.upstream
        assert client is not None and upstream is not None
        self._state = _SPLICE
        if self._timer is not None:
            self._timer.cancel()
        data = bytes(self._buffer)
        self._buffer = bytearray()
        if data:
            upstream.write(data)
            self._up += len(data)
        if self._pending:
            for chunk in self._pending:
                client.write(chunk)
                self._down += len(chunk)
            self._pending = []
            upstream.resume_reading()
        if self._client_eof and upstream.can_write_eof():
            upstream.write_eof()
        if self._upstream_eof and client.can_write_eof():
            client.write_eof()
        self._timer = self._loop.call_later(self.tunnels.settings.idle_timeout / _IDLE_CHECKS, self._idle_check)

    def data_received(self, data: bytes) -> None:
        if self._state is _SPLICE:
            self.upstream.write(data)  # type: ignore[union-attr]
            self._up += len(data)
        elif self._state is not _DONE:
            self._buffer += data
            if self._state is _HELLO:
                self._check_hello()
            elif len(self._buffer) > MAX_HELLO_BYTES and self.client is not None:
                self.client.pause_reading()  # resumed once connected

    def from_upstream(self, data: bytes) -> None:
        if self._state is _SPLICE:
            self.client.write(data)  # type: ignore[union-attr]
            self._down += len(data)
        elif self._state is _HELLO and self.tunnels.settings.plaintext:
            # With plaintext allowed, a server that speaks first (SMTP's greeting) is heard at
            # once: what reaches the client was never the policy's concern, only what leaves.
            self.client.write(data)  # type: ignore[union-attr]
            self._down += len(data)
        elif self._state is not _DONE:
            # The upstream spoke before the client's first bytes were checked: hold it. (Its
            # first bytes can even come before _open resumes, with self.upstream not yet set:
            # _open pauses it then.)
            self._pending.append(data)
            if self.upstream is not None:
                self.upstream.pause_reading()

    def eof_received(self) -> bool:
        self._client_eof = True
        if self._state is _SPLICE:
            upstream = self.upstream
            if self._upstream_eof:
                self.finish("closed")
                return False
            if upstream is not None and upstream.can_write_eof():
                upstream.write_eof()
        elif self._state is _HELLO:
            self._check_hello()
        return True  # keep our write side open: the upstream may still answer

    def upstream_eof(self) -> bool:
        self._upstream_eof = True
        if self._state is _SPLICE:
            client = self.client
            if self._client_eof:
                self.finish("closed")
                return False
            if client is not None and client.can_write_eof():
                client.write_eof()
            return True
        self.finish("upstream_closed", "the upstream closed before the client's first bytes were checked")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is not _DONE:
            self.client = None
            if exc is not None:
                self.finish("client_reset", str(exc), abort=True)
            else:
                self.finish("closed" if self._client_eof and self._upstream_eof else "client_closed")

    def upstream_lost(self, exc: Exception | None) -> None:
        if self._state is not _DONE:
            self.upstream = None
            if exc is not None:
                self.finish("upstream_reset", str(exc), abort=True)
            else:
                self.finish("closed" if self._client_eof and self._upstream_eof else "upstream_closed")

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def _idle_check(self) -> None:
        total = self._up + self._down
        if total != self._seen:
            self._seen, self._quiet = total, 0
        else:
            self._quiet += 1
            if self._quiet >= _IDLE_CHECKS:
                self._timer = None
                self.finish("idle_timeout", f"no byte either way for {self.tunnels.settings.idle_timeout:g}s")
                return
        self._timer = self._loop.call_later(self.tunnels.settings.idle_timeout / _IDLE_CHECKS, self._idle_check)

    # -- ending ----------------------------------------------------------------------------
    def finish(self, outcome: str, detail: str = "", abort: bool = False) -> None:
        """End the tunnel once: close both sides, drop every reference, report it."""
        if self._state is _DONE:
            return
        established = self._state is not _CONNECTING
        self._state = _DONE
        record = self.record
        record.outcome, record.detail = outcome, detail
        record.bytes_up, record.bytes_down = self._up, self._down
        record.end = _now()
        client, upstream = self.client, self.upstream
        for transport in (client, upstream):
            if transport is not None and not transport.is_closing():
                transport.abort() if abort else transport.close()
        self._release(established)
        if not established:
            # Gone (or drained) while the upstream was being connected: no 200 was written.
            exchange = Exchange(start=record.start, method=self._method, path=self._target, upstream=record.upstream)
            exchange.kind, exchange.status, exchange.detail = "client_disconnected", 499, f"{outcome} {detail}".strip()
            observer = self.tunnels.observer
            observer.started(exchange)
            exchange.end = record.end
            observer.finished(exchange)

    def _release(self, established: bool) -> None:
        """Drop the references that make tunnel <-> transports cycles (gc is frozen)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._task = None
        if self._side is not None:
            self._side.tunnel = None
        self.client = self.upstream = self._side = None
        self._buffer = bytearray()
        self._pending = []
        self.tunnels.closed(self, established)

