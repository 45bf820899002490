"""What the forward path reports about each exchange, and who listens.

The forward path fills one `Exchange` (exchange.py) per request and hands it to the
`Observer` at the end. The observer turns it into metrics and the access log; the hot path
knows neither.
"""

from __future__ import annotations

from sidecar.config import Config
from sidecar.errors import TUNNEL_REFUSALS
from sidecar.exchange import Exchange, Trace, TunnelRecord
from sidecar.observe.access_log import AccessLog
from sidecar.observe.inventory import Inventory
from sidecar.observe.metrics import Metrics, PoolStats

__all__ = ["Exchange", "Observer", "Trace", "TunnelRecord"]


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
