"""What the forward path reports about each exchange, and who listens.

The forward path fills one `Exchange` per request and hands it to the `Observer` at the end.
The observer turns it into metrics and the access log; the hot path knows neither.

Timings are `time.perf_counter()` marks (0.0: not reached). The forward path sets `sent`
(request handed to the pool) and `headers` (response head received); the connection marks
come from httpx's `trace` request extension, which httpcore calls about eight times per
request: `Exchange.trace` is therefore a bound coroutine method that does one dict lookup
and one attribute store per event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sidecar.access_log import AccessLog
from sidecar.config import Config
from sidecar.errors import TUNNEL_REFUSALS
from sidecar.inventory import Inventory
from sidecar.metrics import Metrics, PoolStats

if TYPE_CHECKING:
    from sidecar.tunnel import TunnelRecord

_now = time.perf_counter

# httpcore's trace event names ("<logger suffix>.<step>.<started|complete|failed>") we time.
_CONNECT_START, _CONNECT_END, _TLS_START, _TLS_END = range(4)
_TRACE_EVENTS: dict[str, int] = {
    "connection.connect_tcp.started": _CONNECT_START,
    "connection.connect_tcp.complete": _CONNECT_END,
    "connection.start_tls.started": _TLS_START,
    "connection.start_tls.complete": _TLS_END,
}

Trace = Callable[[str, Mapping[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Exchange:
    """One request through the sidecar, as the observer sees it."""

    start: float
    method: str
    path: str  # never the query string
    route: str = "-"
    upstream: str = "-"  # host:port
    status: int = 0
    kind: str | None = None  # error kind, or None when the upstream's answer was relayed
    detail: str = ""
    reason: str | None = None  # a denial's named reason (EgressError.reason), when it has one
    would_deny: str | None = None  # report mode: the host rule that would have refused it
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: bytes | None = None
    reused: bool | None = None  # None: unknown (no connection was reached)
    response_started: bool = False
    sent: float = 0.0  # request handed to the pool (the last attempt's, with retries)
    headers: float = 0.0  # upstream response head received
    first_event: float = 0.0  # first connection trace event after `sent`
    connect_start: float = 0.0
    connect_end: float = 0.0
    tls_start: float = 0.0
    tls_end: float = 0.0
    connects: int = 0  # TCP connections opened for this exchange (retries can open several)
    end: float = 0.0
    intercepted: bool = False  # decrypted inside a CONNECT tunnel (sidecar/intercept.py)

    def mark_sent(self) -> None:
        """Call right before handing the request to the transport (each attempt)."""
        self.sent = _now()
        # A retry starts its timings afresh; `connects` keeps counting across attempts.
        self.first_event = self.connect_start = self.connect_end = self.tls_start = self.tls_end = 0.0

    async def trace(self, name: str, info: Mapping[str, Any]) -> None:
        """httpx `trace` extension callback (async: httpcore awaits it on the async path)."""
        now = _now()
        if not self.first_event:
            self.first_event = now
        event = _TRACE_EVENTS.get(name)
        if event is None:
            return
        if event == _CONNECT_START:
            self.connect_start = now
        elif event == _CONNECT_END:
            self.connect_end = now
            self.connects += 1
        elif event == _TLS_START:
            self.tls_start = now
        else:
            self.tls_end = now


class Observer:
    """Turns finished exchanges into metrics, access-log lines and the egress inventory."""

    def __init__(self, config: Config | None = None, pools: PoolStats | None = None) -> None:
        config = config or Config()
        self.in_flight = 0
        self.metrics: Metrics | None = (
            Metrics(config, self._in_flight, pools) if config.metrics.enabled else None
        )
        self.inventory = Inventory(config.inventory.max_entries)
        self._inventory: Inventory | None = None
        self.access: AccessLog
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config's observer settings: access log switch and level, inventory bound."""
        self.access = AccessLog(config.log.access)  # binds the logger of the level now in force
        self.inventory.resize(config.inventory.max_entries)
        self._inventory = self.inventory if config.inventory.max_entries > 0 else None

    def _in_flight(self) -> float:
        return self.in_flight

    def trace_for(self, exchange: Exchange) -> Trace | None:
        """The httpx `trace` extension callback for this exchange."""
        return exchange.trace

    def started(self, exchange: Exchange) -> None:
        self.in_flight += 1

    def retried(self, route: str, reason: str) -> None:
        """A try on `route` failed and is retried; reason: connect, reset, timeout or a status code."""
        if self.metrics is not None:
            self.metrics.retry(route, reason)

    def finished(self, exchange: Exchange) -> None:
        self.in_flight -= 1
        if exchange.reused is None and exchange.first_event:
            # No connect event after the request reached the pool: it went out on an open connection.
            exchange.reused = not exchange.connect_start
        if self.metrics is not None:
            self.metrics.record(exchange)
        if self._inventory is not None:
            self._inventory.record(exchange)
        self.access.emit(exchange)

    def tunnel_finished(self, record: TunnelRecord) -> None:
        """A tunnel that got its 200 (or its upstream connection) ended: metrics, inventory, one line."""
        if self.metrics is not None:
            self.metrics.tunnel(record)
            if record.would_deny is not None:
                self.metrics.would_deny(record.upstream, record.would_deny)
        if self._inventory is not None:
            self._inventory.record_tunnel(
                record.upstream, bytes_sent=record.bytes_up, bytes_received=record.bytes_down,
                denied=record.outcome if record.outcome in TUNNEL_REFUSALS else None,
                would_deny=record.would_deny, end=record.end or None)
        self.access.tunnel(record)
