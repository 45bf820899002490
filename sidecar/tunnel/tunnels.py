"""TCP tunnels under the egress policy: CONNECT (authority-form) now, captured TLS next.

A tunnel carries the app's own TLS to an upstream the policy allowed, byte for byte. The
order is fixed, so nothing reaches the upstream before every check passed:

1. checks that need no I/O: the destination is not the sidecar (508 `loop`), its port is
   in `policy.connect_ports` (403 `denied_port`), host rules (403 `denied_host`/`denied_ip`,
   EgressPolicy.check_host), `limits.max_tunnels` (503 `overloaded`), drain (503 `draining`);
2. resolve and connect: every resolved address is checked by the address rules and the
   connection is made to a checked address (transport.connect.dial with the policy's hook:
   no rebinding window); failures are the forwarded path's 502/504 kinds;
3. only then `200 Connection Established` (CONNECT) is written;
4. the first client bytes must be a TLS ClientHello (sni.py) whose server name names the
   checked host (case, trailing dot and IDNA form ignored); no SNI is accepted only for an
   IP-literal host; non-TLS bytes only with `policy.connect_plaintext: true`. A refusal
   closes both sides with nothing forwarded; `limits.header_timeout` bounds the wait;
5. splice: bytes both ways with back-pressure (a side whose write buffer passes 256 KiB
   stops the other side's reads), half-closes passed on (write_eof), `timeouts.tunnel_idle`.

Callbacks, not tasks: after the connect (one task) the splice is two asyncio protocols
calling each other's transport, so a chunk costs one read and one write (splice.py: the
tunnel's state machine; this module: the checks before connecting, the cap, the API).

API (stable; used by the CONNECT listener, the transparent listener and interception)
------------------------------------------------------------------------------------
`Tunnels` is built once per process (runtime.build_runtime: `runtime.tunnels`).

- `Tunnels.connect(client, authority, buffered)`: a CONNECT whose head was parsed on
  `client` (an asyncio transport whose protocol is about to be replaced): `authority` the
  raw request target (`host:port`), `buffered` the client bytes after the head. Every
  refusal before the 200 is an HTTP error response in the sidecar's format.
- `Tunnels.open(client, host, port, first_bytes, *, addresses=None, established=None,
  source="transparent", check_sni=True) -> bool`: the generic entry. `host` is what host
  rules check and the SNI must name (routing.normalise_host form: lower case, IPv6 without
  brackets), `addresses` the addresses to dial (e.g. SO_ORIGINAL_DST; each is still checked
  by the address rules), None to resolve `host` through the policy; `first_bytes` client
  bytes already read (the ClientHello so far); `established` what to write to the client
  once the upstream is connected (None: nothing); `check_sni=False` skips the
  SNI-equals-host rule (the caller checked it). False: refused by the checks of step 1, the
  client aborted (no HTTP answer), the caller's protocol still in place; True: the tunnel
  owns the transport (its protocol is replaced) and a later refusal (an address, the
  connect, the ClientHello) closes it. Refusals are logged with `method` = `source`.
- Interception: `Tunnels(intercept=hook)` or `tunnels.intercept = hook`, where
  `hook(record, client, hello) -> bool` is called once the SNI is known and checked,
  before any client byte went upstream. Returning True means the hook took the client
  transport: it must call `client.set_protocol(...)` before returning and feed `hello`
  (all client bytes read so far) to its terminator; the tunnel then closes its upstream
  connection and ends with outcome `intercepted`. `record` (TunnelRecord) has host, port,
  sni and the dialled address. A hook that raises ends that tunnel (`intercept_error`, both
  sides closed, nothing forwarded); the listener goes on.
- `Tunnels.close_all(outcome)`: end every open tunnel (drain).

Observability: each tunnel that got past the connect ends in one `TunnelRecord` handed to
`Observer.tunnel_finished` (access line `event: tunnel`, `egress_tunnels_total{upstream,
outcome}`, bytes, duration); refusals after the 200 (`sni_mismatch`, `no_sni`, `not_tls`)
also count in `egress_denied_total{reason}`. Refusals before it are ordinary error lines
(`egress_error`, method CONNECT) through `Observer.finished`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from sidecar.errors import ERRORS, EgressError, classify
from sidecar.exchange import Exchange, TunnelRecord
from sidecar.ingress.protocol import render_error
from sidecar.policy.egress import PolicyDenied
from sidecar.proxy.routing import normalise_host, split_authority
from sidecar.tunnel.splice import REFUSALS, Intercept, Tunnel, TunnelSettings

if TYPE_CHECKING:
    from sidecar.observe.observer import Observer
    from sidecar.policy.egress import EgressPolicy

# The API's names, importable from here (the splice is an implementation module).
__all__ = ["ESTABLISHED", "REFUSALS", "Intercept", "Tunnel", "TunnelRecord", "TunnelSettings", "Tunnels"]

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_LINGER_SECONDS = 2.0  # after an error answer, as limits.py: let the client read it before closing

_now = time.perf_counter


class _Lingering(asyncio.Protocol):
    """After an error answer: discard what the client still sends, close at its EOF or after
    a short while (closing with unread bytes would send RST and could destroy the answer)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        self.transport.close()
        return False


def _answer_and_close(client: asyncio.Transport, response: bytes | None) -> None:
    if client.is_closing():
        return
    if response is None:
        client.abort()  # no HTTP on this connection (transparent): nothing to say
        return
    client.set_protocol(_Lingering(client))
    if not client.can_write_eof():
        client.write(response)
        client.close()
        return
    client.write(response)
    client.write_eof()
    asyncio.get_running_loop().call_later(_LINGER_SECONDS, client.close)


class Tunnels:
    """Every open tunnel, the cap on them, and the checks a new one passes (module doc)."""

    def __init__(
        self,
        settings: TunnelSettings,
        policy: EgressPolicy,
        observer: Observer,
        *,
        is_self: Callable[[str, int], bool],
        stopping: Callable[[], bool],
        on_open: Callable[[], None],
        on_close: Callable[[], None],
        intercept: Intercept | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.observer = observer
        self.intercept = intercept
        self._is_self = is_self
        self._stopping = stopping
        self._on_open = on_open
        self._on_close = on_close
        self.open_tunnels: set[Tunnel] = set()

    @property
    def active(self) -> int:
        return len(self.open_tunnels)

    # -- entries ---------------------------------------------------------------------------
    def connect(self, client: asyncio.Transport, authority: bytes, buffered: bytes) -> None:
        """A parsed `CONNECT authority` on `client`; `buffered`: client bytes after the head."""
        start = _now()
        target = authority.decode("latin-1")
        try:
            text = authority.decode("ascii")
            host_text, port = split_authority(text)
            if port is None:
                raise ValueError("the authority has no port")
            host = normalise_host(host_text)
        except (ValueError, UnicodeError) as exc:
            self.refused(client, start, target, "-", EgressError("bad_request", f"bad CONNECT target: {exc}"),
                         answer=True)
            return
        self._start(client, start, target, host, port, buffered, None, ESTABLISHED, "connect", True)

    def open(
        self,
        client: asyncio.Transport,
        host: str,
        port: int,
        first_bytes: bytes,
        *,
        addresses: Sequence[str] | None = None,
        established: bytes | None = None,
        source: str = "transparent",
        check_sni: bool = True,
    ) -> bool:
        """The generic entry (module doc); False: refused before connecting, client closed."""
        start = _now()
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._start(client, start, target, host, port, first_bytes, addresses, established, source, check_sni)

    def close_all(self, outcome: str = "drained") -> None:
        for tunnel in list(self.open_tunnels):
            tunnel.finish(outcome, "the sidecar is stopping")

    # -- checks before connecting ----------------------------------------------------------
    def _start(
        self, client: asyncio.Transport, start: float, target: str, host: str, port: int, buffered: bytes,
        addresses: Sequence[str] | None, established: bytes | None, source: str, check_sni: bool,
    ) -> bool:
        upstream = f"{host}:{port}"
        try:
            if self._stopping():
                raise EgressError("draining", "shutting down")
            if self._is_self(host, port):
                raise EgressError("loop", f"{host}:{port} is the sidecar's own listener")
            if port not in self.settings.connect_ports:
                raise PolicyDenied("denied_port", "port", target)
            # report mode: a host rule's refusal comes back as a reason, the tunnel goes on
            would_deny = self.policy.check_host(host, port)
            if self.active >= self.settings.max_tunnels:
                raise EgressError("overloaded", f"{self.active} tunnels open (limits.max_tunnels)")
        except EgressError as exc:
            self.refused(client, start, target, upstream, exc, answer=established is not None,
                         method="CONNECT" if source == "connect" else source)
            return False
        record = TunnelRecord(start=start, host=host, port=port, source=source, would_deny=would_deny)
        tunnel = Tunnel(self, client, record, buffered, established, check_sni, target)
        self.open_tunnels.add(tunnel)
        self._on_open()
        tunnel.begin(addresses)
        return True

    def refused(self, client: asyncio.Transport, start: float, target: str, upstream: str,
                exc: BaseException, *, answer: bool, method: str = "CONNECT") -> None:
        """A refusal before any byte went upstream: error answer (CONNECT), log line, metric."""
        kind = classify(exc)
        subject = exc.subject if isinstance(exc, EgressError) else None
        retry_after = exc.retry_after if isinstance(exc, EgressError) else None
        _answer_and_close(client, render_error(kind, subject, retry_after) if answer else None)
        exchange = Exchange(start=start, method=method, path=target, upstream=upstream)
        exchange.kind, exchange.status, exchange.detail = kind, ERRORS[kind].status, str(exc)
        if isinstance(exc, PolicyDenied):
            exchange.reason = exc.reason
        self.observer.started(exchange)
        exchange.end = _now()
        self.observer.finished(exchange)

    def closed(self, tunnel: Tunnel, established: bool) -> None:
        self.open_tunnels.discard(tunnel)
        self._on_close()
        if established:
            self.observer.tunnel_finished(tunnel.record)


