"""Prometheus metrics: the families of DESIGN.md, built once at start, updated once per request.

Labels are bounded by construction: `route` comes from config, `upstream` is host:port and
capped at `metrics.max_upstreams` distinct values (later ones count as "other"), `method` is
one of the standard methods or "OTHER", `code` is the status, `kind`/`reason` come from the
error table. No path or query ever becomes a label.

The hot path (`record`) looks up one `_Series` per (route, upstream) and adds to plain ints,
floats and bucket lists in it; a collector turns them into the metric families only when
Prometheus scrapes. Live pool connections are not tracked by hand: a collector reads them from
the pool at scrape time too.
"""

from __future__ import annotations

import platform
import sys
from bisect import bisect_left as _bucket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

import httpx
from prometheus_client import CollectorRegistry, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import sidecar
from sidecar.config import Config
from sidecar.errors import TUNNEL_REFUSALS
from sidecar.policy.egress import REASONS as DENIAL_REASONS
from sidecar.resilience.breaker import STATE_VALUES

if TYPE_CHECKING:
    from sidecar.exchange import Exchange, TunnelRecord

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
DENIALS = frozenset({"denied_host", "denied_ip", "denied_port"})

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


class ConfigCollector(Collector):
    """`egress_config_info{sha256}` (the active config) and `egress_config_reloads_total{outcome}`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("egress_config_info", "The active config: sha256 of its canonical JSON "
                                 "(what `egress-sidecar check-config` prints)", labels=["sha256"])
        if self.metrics.config_sha256:
            info.add_metric([self.metrics.config_sha256], 1)
        yield info
        reloads = CounterMetricFamily("egress_config_reloads", "Config reloads (file change or SIGHUP), by "
                                      "outcome: applied, or rejected (the old config stays)", labels=["outcome"])
        for outcome, count in sorted(self.metrics.reloads.items()):
            reloads.add_metric([outcome], count)
        yield reloads


# The `le` label of each bucket, +Inf last, as prometheus_client writes them.
_LE: tuple[str, ...] = (*(floatToGoString(bound) for bound in BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class _Histogram:
    """One histogram child as plain numbers: per-bucket (not cumulative) counts and the sum.

    `counts[bisect_left(BUCKETS, v)]` is the bucket of `v`: the first bound >= v, so a value
    equal to a bound counts in that bound's bucket (`le` is "less than or equal"), and past the
    last bound it lands in the +Inf slot. The cumulative `_bucket` and `_count` series are
    summed at scrape time.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)
        self.sum = 0.0

    def buckets(self) -> list[tuple[str, float]]:
        return list(zip(_LE, accumulate(self.counts), strict=True))


@dataclass(slots=True)
class _Series:
    """Every per-(route, upstream) number of the hot families, made once per pair."""

    route: str
    upstream: str  # the label value, "other" past the cap
    duration: _Histogram = field(default_factory=_Histogram)
    response: _Histogram = field(default_factory=_Histogram)
    pool_wait: _Histogram = field(default_factory=_Histogram)
    connect: _Histogram = field(default_factory=_Histogram)
    tls: _Histogram = field(default_factory=_Histogram)
    opened: int = 0
    reused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    intercepted: int = 0
    # (method as sent, status) -> the one-int cell of its requests_total series. Only standard
    # methods are cached here, so the dict stays bounded; the cells are shared with
    # `Metrics._requests`, which keeps the exposition's order.
    requests: dict[tuple[str, int], list[int]] = field(default_factory=dict)


# (`_Series` field, family name, HELP) of the histograms and the counters, in exposition order.
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("duration", "egress_request_duration_seconds",
     "Time from the request's arrival to the last response byte sent to the app"),
    ("response", "egress_upstream_response_seconds",
     ("Time from handing the request to the pool to the upstream's response headers "
      "(pool wait, connect and TLS included)")),
    ("pool_wait", "egress_pool_wait_seconds",
     ("Approximate wait for a pool connection: from handing the request to the pool "
      "to the first connection event (connect start, or request headers on a reused "
      "connection)")),
    ("connect", "egress_upstream_connect_seconds", "TCP connect time of new upstream connections"),
    ("tls", "egress_upstream_tls_handshake_seconds", "TLS handshake time of new upstream connections"),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("opened", "egress_upstream_connections_opened", "Upstream connections opened (TCP connected)"),
    ("reused", "egress_requests_on_reused_connection", "Requests sent on a pooled connection that was already open"),
    ("bytes_in", "egress_request_bytes", "Request body bytes sent upstream"),
    ("bytes_out", "egress_response_bytes", "Response body bytes relayed to the app"),
    ("intercepted", "egress_intercepted_requests",
     "Requests decrypted inside a CONNECT tunnel (TLS interception) and sent through the pool"),
)
_RL = ["route", "upstream"]


def _counter(name: str, documentation: str, labels: list[str],
             values: Mapping[tuple[str, str], int] | Mapping[tuple[str, str, str], int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in values.items():
        family.add_metric(key, value)
    return family


class _Families(Collector):
    """The request families, built from `Metrics`' plain numbers when Prometheus scrapes.

    Same names, HELP, types, labels and buckets as prometheus_client's Counter/Gauge/Histogram
    would expose (no `_created`), in the order they used to be registered.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # The families without samples: the registry learns the names and refuses a clash.
        return _families([], {}, None, {}, {}, {})

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        return _families(list(m._series.values()), m._requests, float(m.in_flight()), m._errors, m._denied,
                         m._retries, m._would_deny)


def _families(series: list[_Series], requests: Mapping[tuple[str, str, str, str], list[int]],
              in_flight: float | None, errors: Mapping[tuple[str, str, str], int],
              denied: Mapping[tuple[str, str], int], retries: Mapping[tuple[str, str], int],
              would_deny: Mapping[tuple[str, str], int] | None = None) -> list[Metric]:
    requests_family = CounterMetricFamily("egress_requests", "Requests answered, by status code (errors included)",
                                          labels=[*_RL, "method", "code"])
    for key, cell in requests.items():
        requests_family.add_metric(key, cell[0])
    in_flight_family = GaugeMetricFamily("egress_requests_in_flight", "Requests being handled now")
    if in_flight is not None:
        in_flight_family.add_metric([], in_flight)
    families: list[Metric] = [requests_family, in_flight_family]
    for attr, name, documentation in _HISTOGRAMS:
        histogram = HistogramMetricFamily(name, documentation, labels=_RL)
        for s in series:
            child: _Histogram = getattr(s, attr)
            histogram.add_metric([s.route, s.upstream], child.buckets(), child.sum)
        families.append(histogram)
    for attr, name, documentation in _COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=_RL)
        for s in series:
            counter.add_metric([s.route, s.upstream], getattr(s, attr))
        families.append(counter)
    families.append(_counter("egress_errors", "Errors by kind (the x-egress-error values; client_disconnected "
                             "when the app went away)", [*_RL, "kind"], errors))
    families.append(_counter("egress_denied", "Requests the egress policy refused, by reason",
                             ["route", "reason"], denied))
    families.append(_counter("egress_retries", "Upstream attempts retried, by reason", ["route", "reason"], retries))
    families.append(_counter("egress_would_deny", "Requests and tunnels the host rules would refuse, forwarded "
                             "because policy.mode is report, by destination and reason", ["upstream", "reason"],
                             would_deny or {}))
    return families


# Seconds. Tunnels live from a refused handshake (ms) to a client's kept connection (an
# hour: timeouts.tunnel_idle), so their buckets span further than the requests'.
TUNNEL_BUCKETS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
_TUNNEL_LE: tuple[str, ...] = (*(floatToGoString(b) for b in TUNNEL_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class _TunnelFamilies(Collector):
    """The tunnel families, from `Metrics`' plain numbers when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        yield _counter("egress_tunnels", "CONNECT tunnels ended, by how they ended", ["upstream", "outcome"],
                       m._tunnels)
        active = GaugeMetricFamily("egress_tunnels_active", "CONNECT tunnels open now (connecting included)")
        active.add_metric([], m._tunnels_active())
        yield active
        yield _counter("egress_tunnel_bytes", "Bytes carried by tunnels: up (app to upstream) and down",
                       ["upstream", "direction"], m._tunnel_bytes)
        histogram = HistogramMetricFamily("egress_tunnel_duration_seconds",
                                          "Tunnel lifetime, from the CONNECT to the close")
        counts = m._tunnel_durations
        histogram.add_metric([], list(zip(_TUNNEL_LE, accumulate(counts), strict=True)), m._tunnel_seconds)
        yield histogram


class Metrics:
    """The registry and every family; one instance per process, made at start.

    The per-request families are plain ints, floats and lists updated without locks (the data
    path and the admin /metrics endpoint share the one event-loop thread); `_Families` turns
    them into metric families at scrape time. prometheus_client's own objects take a lock and
    walk the buckets in Python on every update, which cost several µs per request.
    """

    def __init__(self, config: Config, in_flight: Callable[[], float], pools: PoolStats | None = None) -> None:
        self.max_upstreams = config.metrics.max_upstreams
        self.in_flight = in_flight
        # No `_created` series: they double the series count and no dashboard of ours reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self.registry = CollectorRegistry()
        # The client library's process metrics (CPU, RSS, fds, start time), GC and platform.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        self._upstreams: dict[str, str] = {}
        self._series: dict[tuple[str, str], _Series] = {}
        self._requests: dict[tuple[str, str, str, str], list[int]] = {}  # (route, upstream, method, code)
        self._errors: dict[tuple[str, str, str], int] = {}  # (route, upstream, kind)
        self._denied: dict[tuple[str, str], int] = {}  # (route, reason)
        self._retries: dict[tuple[str, str], int] = {}  # (route, reason)
        self._would_deny: dict[tuple[str, str], int] = {}  # (upstream, reason)
        # Known label values start at 0 (Prometheus' advice), so rate() sees the first denial and
        # the dashboard's denial panel shows 0 rather than "no data" on a quiet day.
        # The series are the policy's named reasons (what `reason` is at a denial), not the kinds.
        for reason in sorted(DENIAL_REASONS):
            self._denied[("-", reason)] = 0
        registry.register(_Families(self))
        self._tunnels: dict[tuple[str, str], int] = {}  # (upstream, outcome)
        self._tunnel_bytes: dict[tuple[str, str], int] = {}  # (upstream, direction)
        self._tunnel_durations = [0] * len(_TUNNEL_LE)
        self._tunnel_seconds = 0.0
        self._tunnels_active: Callable[[], float] = lambda: 0
        registry.register(_TunnelFamilies(self))

        Info("egress_build", "Build information", registry=registry).info(
            # The packages' own version attributes, not importlib.metadata: that import and its scan
            # of sys.path cost ~20 ms at start (a unit test checks they agree with the metadata).
            {"version": sidecar.__version__, "python": platform.python_version(),
             "httpx": httpx.__version__, "implementation": sys.implementation.name}
        )
        if pools is not None:
            registry.register(PoolCollector(pools, config.pool.max_connections))
        self.config_sha256 = ""
        self.reloads: dict[str, int] = {"applied": 0, "rejected": 0}
        registry.register(ConfigCollector(self))

    def watch_pools(self, stats: PoolStats, limit: int) -> None:
        """Export the live pools' connections (read through the active snapshot at scrape time)."""
        self.registry.register(PoolCollector(stats, limit))

    def config_loaded(self, sha256: str) -> None:
        """The config now active (`egress_config_info{sha256}`), at start and after each applied reload."""
        self.config_sha256 = sha256

    def config_reload(self, outcome: str) -> None:
        """A reload was applied or rejected (`egress_config_reloads_total{outcome}`)."""
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1

    def watch_breakers(self, states: Callable[[], Mapping[str, str]]) -> None:
        """Export the circuit breakers' states (resilience.Breakers.states) at scrape time."""
        self.registry.register(BreakerCollector(states))

    def watch_abandoned(self, counts: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Export what became of connections whose app went away (Upstream.abandoned_counts)."""
        self.registry.register(AbandonedCollector(counts))

    def watch_tunnels(self, active: Callable[[], float]) -> None:
        """Export the number of open tunnels (`egress_tunnels_active`, read by `active`) at scrape time."""
        self._tunnels_active = active

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
            series = self._series[(route, label)] = _Series(route, label)
        return series

    def _request_cell(self, series: _Series, method: str, code: int) -> list[int]:
        """The requests_total cell of (series, method, code), made on first use."""
        known = method in METHODS
        key = (series.route, series.upstream, method if known else "OTHER", str(code))
        cell = self._requests.get(key)
        if cell is None:
            cell = self._requests[key] = [0]
        if known:  # any other token is looked up here each time rather than cached per series
            series.requests[(method, code)] = cell
        return cell

    # -- updates --------------------------------------------------------------------------

    def error(self, route: str, upstream_label: str, kind: str) -> None:
        key = (route, upstream_label, kind)
        self._errors[key] = self._errors.get(key, 0) + 1

    def deny(self, route: str, reason: str) -> None:
        key = (route, reason)
        self._denied[key] = self._denied.get(key, 0) + 1

    def would_deny(self, upstream: str, reason: str) -> None:
        """Count a destination the host rules would refuse (report mode): requests and tunnels alike."""
        key = (self.upstream_label(upstream), reason)
        self._would_deny[key] = self._would_deny.get(key, 0) + 1

    def retry(self, route: str, reason: str) -> None:
        key = (route, reason)
        self._retries[key] = self._retries.get(key, 0) + 1

    def record(self, ex: Exchange) -> None:
        """Count one finished exchange: the only per-request metrics work.

        Inlined on purpose (no helper calls on the common path): this runs once per request.
        """
        series = self._series.get((ex.route, ex.upstream)) or self.series(ex.route, ex.upstream)
        cell = series.requests.get((ex.method, ex.status)) or self._request_cell(series, ex.method, ex.status)
        cell[0] += 1
        value = ex.end - ex.start
        histogram = series.duration
        histogram.counts[_bucket(BUCKETS, value)] += 1
        histogram.sum += value
        sent = ex.sent
        if sent:
            if ex.headers:
                value = ex.headers - sent
                histogram = series.response
                histogram.counts[_bucket(BUCKETS, value)] += 1
                histogram.sum += value
            if ex.first_event:
                value = ex.first_event - sent
                histogram = series.pool_wait
                histogram.counts[_bucket(BUCKETS, value)] += 1
                histogram.sum += value
            if ex.connect_end:
                value = ex.connect_end - ex.connect_start
                histogram = series.connect
                histogram.counts[_bucket(BUCKETS, value)] += 1
                histogram.sum += value
            if ex.tls_end:
                value = ex.tls_end - ex.tls_start
                histogram = series.tls
                histogram.counts[_bucket(BUCKETS, value)] += 1
                histogram.sum += value
            reused = ex.reused
            if ex.connects:
                series.opened += ex.connects
            elif reused is False and not ex.connect_start:  # a transport that reports reuse but traces no connects
                series.opened += 1
            if reused:
                series.reused += 1
        if ex.bytes_in:
            series.bytes_in += ex.bytes_in
        if ex.bytes_out:
            series.bytes_out += ex.bytes_out
        if ex.intercepted:
            series.intercepted += 1
        if ex.would_deny is not None:
            self.would_deny(ex.upstream, ex.would_deny)
        kind = ex.kind
        if kind is not None:
            self.error(ex.route, series.upstream, kind)
            if kind in DENIALS:
                self.deny(ex.route, ex.reason or kind)

    def tunnel(self, record: TunnelRecord) -> None:
        """Count one ended tunnel (once per tunnel, not per chunk)."""
        upstream = self.upstream_label(record.upstream)
        key = (upstream, record.outcome)
        self._tunnels[key] = self._tunnels.get(key, 0) + 1
        for direction, size in (("up", record.bytes_up), ("down", record.bytes_down)):
            key = (upstream, direction)
            self._tunnel_bytes[key] = self._tunnel_bytes.get(key, 0) + size
        duration = record.end - record.start
        self._tunnel_durations[_bucket(TUNNEL_BUCKETS, duration)] += 1
        self._tunnel_seconds += duration
        if record.outcome in TUNNEL_REFUSALS:
            self.deny("-", record.outcome)

    # -- exposition -----------------------------------------------------------------------

    def exposition(self, accept: str) -> tuple[bytes, bytes]:
        """(content type, body): OpenMetrics when `accept` asks for it, else the text format."""
        encoder, content_type = choose_encoder(accept)
        return content_type.encode("latin-1"), encoder(self.registry)
