"""What the forward path reports about each exchange, and who listens.

The forward path fills one `Exchange` (exchange.py) per request and hands it to the
`Observer` at the end. The observer turns it into metrics and the access log; the hot path
knows neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sidecar.access_log import AccessLog
from sidecar.config import Config
from sidecar.exchange import Exchange, Trace, TunnelRecord
from sidecar.metrics import Metrics, PoolStats

__all__ = ["Exchange", "Observer", "Trace", "TunnelRecord"]


class Observer:
    """Turns finished exchanges into metrics and access-log lines."""

    def __init__(
        self,
        config: Config | None = None,
        pools: PoolStats | None = None,
        breakers: Callable[[], Mapping[str, str]] | None = None,
        abandoned: Callable[[], Mapping[str, tuple[int, int]]] | None = None,
    ) -> None:
        """`pools`, `breakers`, `abandoned`: what the metrics read at scrape time (Upstream.pool_stats,
        Breakers.states, Upstream.abandoned_counts), handed in when the runtime is built."""
        config = config or Config()
        self.in_flight = 0
        metrics = self.metrics = Metrics(config, self._in_flight, pools) if config.metrics.enabled else None
        if metrics is not None:
            if breakers is not None:
                metrics.watch_breakers(breakers)
            if abandoned is not None:
                metrics.watch_abandoned(abandoned)
        self.access = AccessLog(config.log.access)

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
        self.access.emit(exchange)

    def watch_tunnels(self, active: Callable[[], float]) -> None:
        """Export the open tunnels' count, read by `active` at scrape time (the tunnels are
        built after the observer, which they report to)."""
        if self.metrics is not None:
            self.metrics.watch_tunnels(active)

    def tunnel_finished(self, record: TunnelRecord) -> None:
        """A tunnel that got its 200 (or its upstream connection) ended: metrics and one line."""
        if self.metrics is not None:
            self.metrics.tunnel(record)
        self.access.tunnel(record)
