"""Prometheus metrics: the families of DESIGN.md, built once at start, updated once per request.

Labels are bounded by construction: `route` comes from config, `upstream` is host:port and
capped at `metrics.max_upstreams` distinct values (later ones count as "other"), `method` is
one of the standard methods or "OTHER", `code` is the status, `kind`/`reason` come from the
error table. No path or query ever becomes a label.

The hot path (`record`) only looks up pre-bound label children in dicts keyed by the label
tuple; `.labels()` (which validates and formats) runs once per new combination. Live pool
connections are not tracked by hand: a collector reads them from the pool at scrape time.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

import sidecar
from sidecar.breaker import STATE_VALUES
from sidecar.config import Config

if TYPE_CHECKING:
    from sidecar.observe import Exchange

# Seconds. A proxy's latencies span loopback connects (~0.1 ms, all in the first bucket),
# TLS handshakes and typical API calls (5-500 ms), up to long downloads and read timeouts
# (the default read timeout is 30 s; slower still lands in +Inf). Roughly 1-2.5-5 per decade
# keeps histogram_quantile's interpolation error near 2x at worst, with 14 buckets.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)

# Any other method (h11 accepts any token) is counted as OTHER so clients cannot mint labels.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})

OTHER = "other"

# Error kinds that are policy decisions; they also count in egress_denied_total{reason}.
DENIALS = frozenset({"denied_host", "denied_ip"})

PoolStats = Callable[[], Mapping[str, tuple[int, int]]]


class PoolCollector(Collector):
    """`egress_upstream_connections{pool,state}` read from the pools when Prometheus scrapes."""

    def __init__(self, stats: PoolStats, limit: int) -> None:
        self.stats = stats
        self.limit = limit

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily; do not read the pool at registration

    def collect(self) -> Iterable[Metric]:
        connections = GaugeMetricFamily(
            "egress_upstream_connections",
            "Upstream connections in the pool by state (active: carrying a request; idle: kept alive)",
            labels=["pool", "state"],
        )
        limit = GaugeMetricFamily(
            "egress_upstream_connections_limit", "Most connections a pool may hold (pool.max_connections)",
            labels=["pool"],
        )
        for pool, (active, idle) in self.stats().items():
            connections.add_metric([pool, "active"], active)
            connections.add_metric([pool, "idle"], idle)
            limit.add_metric([pool], self.limit)
        yield connections
        yield limit


class BreakerCollector(Collector):
    """`egress_circuit_state{upstream}`: 0 closed, 1 half-open, 2 open, read at scrape time."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self.states = states

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "egress_circuit_state", "Circuit breaker state per upstream (0 closed, 1 half-open, 2 open)",
            labels=["upstream"],
        )
        for upstream, state in sorted(self.states().items()):
            family.add_metric([upstream], STATE_VALUES[state])
        yield family


class AbandonedCollector(Collector):
    """`egress_upstream_abandoned_total{pool,outcome}`: exchanges whose app went away after a
    connection was assigned, by what became of the connection, read from the pools at scrape
    time (monotonic counts kept by the transport)."""

    def __init__(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        self.counts = counts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "egress_upstream_abandoned",
            "Upstream exchanges whose app went away after a connection was assigned, by outcome: kept (the rest "
            "of the response was read and the connection reused) or closed",
            labels=["pool", "outcome"],
        )
        for pool, (kept, closed) in sorted(self.counts().items()):
            family.add_metric([pool, "kept"], kept)
            family.add_metric([pool, "closed"], closed)
        yield family


@dataclass(slots=True)
class _Series:
    """Label children for one (route, upstream) pair, bound once."""

    upstream: str
    duration: Histogram
    response: Histogram
    pool_wait: Histogram
    connect: Histogram
    tls: Histogram
    opened: Counter
    reused: Counter
    bytes_in: Counter
    bytes_out: Counter


class Metrics:
    """The registry and every family; one instance per process, made at start."""

    def __init__(self, config: Config, in_flight: Callable[[], float], pools: PoolStats | None = None) -> None:
        self.max_upstreams = config.metrics.max_upstreams
        # No `_created` series: they double the series count and no dashboard of ours reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry()
        # The client library's process metrics (CPU, RSS, fds, start time), GC and platform.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        rl = ["route", "upstream"]
        self.requests = Counter("egress_requests", "Requests answered, by status code (errors included)",
                                [*rl, "method", "code"], registry=registry)
        self.in_flight = Gauge("egress_requests_in_flight", "Requests being handled now", registry=registry)
        self.in_flight.set_function(in_flight)
        self.duration = Histogram("egress_request_duration_seconds",
                                  "Time from the request's arrival to the last response byte sent to the app",
                                  rl, buckets=BUCKETS, registry=registry)
        self.response = Histogram("egress_upstream_response_seconds",
                                  "Time from handing the request to the pool to the upstream's response headers "
                                  "(pool wait, connect and TLS included)", rl, buckets=BUCKETS, registry=registry)
        self.pool_wait = Histogram("egress_pool_wait_seconds",
                                   "Approximate wait for a pool connection: from handing the request to the pool "
                                   "to the first connection event (connect start, or request headers on a reused "
                                   "connection)", rl, buckets=BUCKETS, registry=registry)
        self.connect = Histogram("egress_upstream_connect_seconds", "TCP connect time of new upstream connections",
                                 rl, buckets=BUCKETS, registry=registry)
        self.tls = Histogram("egress_upstream_tls_handshake_seconds", "TLS handshake time of new upstream "
                             "connections", rl, buckets=BUCKETS, registry=registry)
        self.opened = Counter("egress_upstream_connections_opened", "Upstream connections opened (TCP connected)",
                              rl, registry=registry)
        self.reused = Counter("egress_requests_on_reused_connection",
                              "Requests sent on a pooled connection that was already open", rl, registry=registry)
        self.bytes_in = Counter("egress_request_bytes", "Request body bytes sent upstream", rl, registry=registry)
        self.bytes_out = Counter("egress_response_bytes", "Response body bytes relayed to the app", rl,
                                 registry=registry)
        self.errors = Counter("egress_errors", "Errors by kind (the x-egress-error values; "
                              "client_disconnected when the app went away)", [*rl, "kind"], registry=registry)
        self.denied = Counter("egress_denied", "Requests the egress policy refused, by reason",
                              ["route", "reason"], registry=registry)
        self.retries = Counter("egress_retries", "Upstream attempts retried, by reason", ["route", "reason"],
                               registry=registry)
        Info("egress_build", "Build information", registry=registry).info(
            # The packages' own version attributes, not importlib.metadata: that import and its scan
            # of sys.path cost ~20 ms at start (a unit test checks they agree with the metadata).
            {"version": sidecar.__version__, "python": platform.python_version(),
             "httpx": httpx.__version__, "implementation": sys.implementation.name}
        )
        if pools is not None:
            registry.register(PoolCollector(pools, config.pool.max_connections))

        self._upstreams: dict[str, str] = {}
        self._series: dict[tuple[str, str], _Series] = {}
        self._requests: dict[tuple[str, str, str, int], Counter] = {}
        self._errors: dict[tuple[str, str, str], Counter] = {}
        self._denied: dict[tuple[str, str], Counter] = {}
        self._retries: dict[tuple[str, str], Counter] = {}
        # Known label values start at 0 (Prometheus' advice), so rate() sees the first denial and
        # the dashboard's denial panel shows 0 rather than "no data" on a quiet day.
        for kind in sorted(DENIALS):
            self._child(self._denied, self.denied, ("-", kind))  # type: ignore[arg-type]

    def watch_breakers(self, states: Callable[[], Mapping[str, str]]) -> None:
        """Export the circuit breakers' states (resilience.Breakers.states) at scrape time."""
        self.registry.register(BreakerCollector(states))

    def watch_abandoned(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Export what became of connections whose app went away (Upstream.abandoned_counts)."""
        self.registry.register(AbandonedCollector(counts))

    # -- label handling -------------------------------------------------------------------

    def upstream_label(self, upstream: str) -> str:
        """host:port as a label value, or "other" once `max_upstreams` distinct values exist."""
        label = self._upstreams.get(upstream)
        if label is None:
            label = upstream if len(self._upstreams) < self.max_upstreams else OTHER
            if label is not OTHER:
                self._upstreams[upstream] = label
        return label

    def series(self, route: str, upstream: str) -> _Series:
        series = self._series.get((route, upstream))
        if series is None:
            label = self.upstream_label(upstream)
            if label is OTHER:
                # Past the cap every new upstream shares one "other" entry per route; the raw
                # host is not cached, so the dict stays bounded too.
                series = self._series.get((route, OTHER))
                if series is not None:
                    return series
            series = _Series(
                label,
                self.duration.labels(route, label),
                self.response.labels(route, label),
                self.pool_wait.labels(route, label),
                self.connect.labels(route, label),
                self.tls.labels(route, label),
                self.opened.labels(route, label),
                self.reused.labels(route, label),
                self.bytes_in.labels(route, label),
                self.bytes_out.labels(route, label),
            )
            self._series[(route, label)] = series
        return series

    @staticmethod
    def _child(cache: dict[tuple[str, ...], Counter], family: Counter, key: tuple[str, ...]) -> Counter:
        child = cache.get(key)
        if child is None:
            child = cache[key] = family.labels(*key)
        return child

    # -- updates --------------------------------------------------------------------------

    def request(self, route: str, upstream_label: str, method: str, code: int) -> Counter:
        """The requests_total child; `upstream_label` is already capped (`series(...).upstream`)."""
        key = (route, upstream_label, method if method in METHODS else "OTHER", code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key[:3], str(code))
        return child

    def error(self, route: str, upstream_label: str, kind: str) -> None:
        self._child(self._errors, self.errors, (route, upstream_label, kind)).inc()  # type: ignore[arg-type]

    def deny(self, route: str, reason: str) -> None:
        self._child(self._denied, self.denied, (route, reason)).inc()  # type: ignore[arg-type]

    def retry(self, route: str, reason: str) -> None:
        self._child(self._retries, self.retries, (route, reason)).inc()  # type: ignore[arg-type]

    def record(self, ex: Exchange) -> None:
        """Count one finished exchange: the only per-request metrics work."""
        series = self._series.get((ex.route, ex.upstream)) or self.series(ex.route, ex.upstream)
        self.request(ex.route, series.upstream, ex.method, ex.status).inc()
        series.duration.observe(ex.end - ex.start)
        sent = ex.sent
        if sent:
            if ex.headers:
                series.response.observe(ex.headers - sent)
            if ex.first_event:
                series.pool_wait.observe(ex.first_event - sent)
            if ex.connect_end:
                series.connect.observe(ex.connect_end - ex.connect_start)
            if ex.tls_end:
                series.tls.observe(ex.tls_end - ex.tls_start)
            reused = ex.reused
            if ex.connects:
                series.opened.inc(ex.connects)
            elif reused is False and not ex.connect_start:  # a transport that reports reuse but traces no connects
                series.opened.inc()
            if reused:
                series.reused.inc()
        if ex.bytes_in:
            series.bytes_in.inc(ex.bytes_in)
        if ex.bytes_out:
            series.bytes_out.inc(ex.bytes_out)
        kind = ex.kind
        if kind is not None:
            self.error(ex.route, series.upstream, kind)
            if kind in DENIALS:
                self.deny(ex.route, ex.reason or kind)

    # -- exposition -----------------------------------------------------------------------

    def exposition(self, accept: str) -> tuple[bytes, bytes]:
        """(content type, body): OpenMetrics when `accept` asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept)
        return content_type.encode("latin-1"), encoder(self.registry)
