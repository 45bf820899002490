"""The observer's pure parts: label bounds, trace timings, denial/retry counts, redaction, log lines."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pytest
from prometheus_client import Counter
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Config, Log, MetricsSettings
from sidecar.observe import log as log_module
from sidecar.observe.access_log import access_fields
from sidecar.observe.metrics import BUCKETS
from sidecar.observe.metrics import Metrics as Metrics
from sidecar.observe.observer import Exchange, Observer
from sidecar.policy.egress import REASONS
from tests.prometheus import promtool_check


def observer(max_upstreams: int = 100, pools: dict[str, tuple[int, int]] | None = None) -> Observer:
    config = Config(metrics=MetricsSettings(max_upstreams=max_upstreams))
    return Observer(config, (lambda: pools) if pools is not None else None)


def sample(obs: Observer, name: str, **labels: str) -> float | None:
    assert obs.metrics is not None
    return obs.metrics.registry.get_sample_value(name, labels)


def finish(obs: Observer, **fields: object) -> Exchange:
    exchange = Exchange(start=time.perf_counter(), method=str(fields.pop("method", "GET")), path="/x")
    obs.started(exchange)
    for key, value in fields.items():
        setattr(exchange, key, value)
    exchange.end = time.perf_counter()
    obs.finished(exchange)
    return exchange


def test_buckets_span_one_millisecond_to_thirty_seconds() -> None:
    assert BUCKETS[0] == 0.001 and BUCKETS[-1] == 30.0
    assert list(BUCKETS) == sorted(BUCKETS)


def test_denials_count_by_reason_and_as_errors() -> None:
    obs = observer()
    finish(obs, route="-", upstream="169.254.169.254:80", status=403, kind="denied_ip", reason="metadata")
    finish(obs, route="gh", upstream="evil.example:443", status=403, kind="denied_host")
    assert sample(obs, "egress_denied_total", route="-", reason="metadata") == 1
    # Without a named reason the kind is the reason.
    assert sample(obs, "egress_denied_total", route="gh", reason="denied_host") == 1
    assert sample(obs, "egress_errors_total", route="-", upstream="169.254.169.254:80", kind="denied_ip") == 1
    assert sample(obs, "egress_requests_total", route="gh", upstream="evil.example:443", method="GET",
                  code="403") == 1


def test_denial_series_start_at_zero_for_every_named_reason_and_no_kind() -> None:
    obs = observer()
    for reason in ("loopback", "metadata", "private", "link_local", "listener", "host_denied", "not_allowed"):
        assert sample(obs, "egress_denied_total", route="-", reason=reason) == 0
    for kind in ("denied_host", "denied_ip"):  # error kinds, never a reason a denial is counted under
        assert sample(obs, "egress_denied_total", route="-", reason=kind) is None


def test_non_denial_errors_are_not_denials() -> None:
    obs = observer()
    finish(obs, status=502, kind="connect_error", upstream="a:1")
    assert sample(obs, "egress_errors_total", route="-", upstream="a:1", kind="connect_error") == 1
    assert sample(obs, "egress_denied_total", route="-", reason="connect_error") is None


def test_upstream_label_is_capped_and_later_hosts_count_as_other() -> None:
    obs = observer(max_upstreams=2)
    for host in ("a:443", "b:443", "c:443", "d:443", "a:443"):
        finish(obs, route="r", upstream=host, status=200)
    assert sample(obs, "egress_requests_total", route="r", upstream="a:443", method="GET", code="200") == 2
    assert sample(obs, "egress_requests_total", route="r", upstream="b:443", method="GET", code="200") == 1
    assert sample(obs, "egress_requests_total", route="r", upstream="other", method="GET", code="200") == 2
    assert sample(obs, "egress_requests_total", route="r", upstream="c:443", method="GET", code="200") is None
    assert obs.metrics is not None and len(obs.metrics._upstreams) == 2
    # Hosts past the cap share one cached entry: the caches stay bounded too.
    assert set(obs.metrics._series) == {("r", "a:443"), ("r", "b:443"), ("r", "other")}


def test_unknown_methods_do_not_mint_labels() -> None:
    obs = observer()
    finish(obs, method="BREW", upstream="a:1", status=200)
    assert sample(obs, "egress_requests_total", route="-", upstream="a:1", method="OTHER", code="200") == 1


def _trace(exchange: Exchange, *names: str) -> None:
    async def run() -> None:
        for name in names:
            await exchange.trace(name, {})

    asyncio.run(run())


NEW_CONNECTION = (
    "connection.connect_tcp.started", "connection.connect_tcp.complete",
    "connection.start_tls.started", "connection.start_tls.complete",
    "http11.send_request_headers.started", "http11.send_request_headers.complete",
    "http11.send_request_body.started", "http11.send_request_body.complete",
    "http11.receive_response_headers.started", "http11.receive_response_headers.complete",
)
REUSED_CONNECTION = NEW_CONNECTION[4:]


def test_trace_on_a_new_connection_times_connect_tls_and_counts_an_open() -> None:
    obs = observer()
    exchange = Exchange(start=time.perf_counter(), method="GET", path="/x", route="r", upstream="a:443")
    obs.started(exchange)
    exchange.mark_sent()
    _trace(exchange, *NEW_CONNECTION)
    exchange.headers = exchange.end = time.perf_counter()
    exchange.status = 200
    assert exchange.sent <= exchange.first_event == exchange.connect_start
    assert exchange.connect_start <= exchange.connect_end <= exchange.tls_start <= exchange.tls_end
    obs.finished(exchange)
    assert exchange.reused is False
    labels = {"route": "r", "upstream": "a:443"}
    assert sample(obs, "egress_upstream_connections_opened_total", **labels) == 1
    assert sample(obs, "egress_requests_on_reused_connection_total", **labels) == 0
    assert sample(obs, "egress_upstream_connect_seconds_count", **labels) == 1
    assert sample(obs, "egress_upstream_tls_handshake_seconds_count", **labels) == 1
    assert sample(obs, "egress_pool_wait_seconds_count", **labels) == 1
    assert sample(obs, "egress_upstream_response_seconds_count", **labels) == 1


def test_trace_without_connect_event_is_a_reused_connection() -> None:
    obs = observer()
    exchange = Exchange(start=time.perf_counter(), method="GET", path="/x", route="r", upstream="a:443")
    obs.started(exchange)
    exchange.mark_sent()
    _trace(exchange, *REUSED_CONNECTION)
    exchange.end = time.perf_counter()
    obs.finished(exchange)
    assert exchange.reused is True and exchange.connect_start == 0.0
    labels = {"route": "r", "upstream": "a:443"}
    assert sample(obs, "egress_requests_on_reused_connection_total", **labels) == 1
    assert sample(obs, "egress_upstream_connections_opened_total", **labels) == 0
    assert sample(obs, "egress_upstream_connect_seconds_count", **labels) == 0


def test_a_retry_restarts_the_timings_but_keeps_counting_connections() -> None:
    obs = observer()
    exchange = Exchange(start=time.perf_counter(), method="GET", path="/x", route="r", upstream="a:443")
    exchange.mark_sent()
    _trace(exchange, *NEW_CONNECTION[:4])
    obs.retried("r", "reset")
    exchange.mark_sent()
    _trace(exchange, *REUSED_CONNECTION)
    assert exchange.connects == 1 and exchange.connect_start == 0.0
    assert sample(obs, "egress_retries_total", route="r", reason="reset") == 1


def test_in_flight_gauge_follows_started_and_finished() -> None:
    obs = observer()
    exchange = Exchange(start=time.perf_counter(), method="GET", path="/x")
    obs.started(exchange)
    assert sample(obs, "egress_requests_in_flight") == 1
    exchange.end = time.perf_counter()
    obs.finished(exchange)
    assert sample(obs, "egress_requests_in_flight") == 0


def test_pool_gauges_come_from_the_pool_at_scrape_time() -> None:
    pools = {"default": (3, 5), "github": (0, 1)}
    obs = observer(pools=pools)
    assert sample(obs, "egress_upstream_connections", pool="default", state="active") == 3
    assert sample(obs, "egress_upstream_connections", pool="github", state="idle") == 1
    pools["default"] = (0, 8)
    assert sample(obs, "egress_upstream_connections", pool="default", state="active") == 0
    assert sample(obs, "egress_upstream_connections_limit", pool="default") == 100


def test_abandoned_connection_counts_come_from_the_pools_at_scrape_time() -> None:
    counts = {"default": (7, 2)}
    obs = observer()
    assert obs.metrics is not None
    obs.metrics.watch_abandoned(lambda: counts)
    assert sample(obs, "egress_upstream_abandoned_total", pool="default", outcome="kept") == 7
    assert sample(obs, "egress_upstream_abandoned_total", pool="default", outcome="closed") == 2
    counts["default"] = (9, 2)
    assert sample(obs, "egress_upstream_abandoned_total", pool="default", outcome="kept") == 9
    _, body = obs.metrics.exposition("application/openmetrics-text;version=1.0.0")
    assert b'egress_upstream_abandoned_total{outcome="kept",pool="default"} 9.0' in body


def test_exposition_speaks_openmetrics_only_when_asked() -> None:
    obs = observer()
    assert obs.metrics is not None
    content_type, body = obs.metrics.exposition("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert content_type.startswith(b"text/plain") and b"egress_build_info{" in body
    content_type, body = obs.metrics.exposition("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith(b"application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_metrics_disabled_means_no_registry() -> None:
    assert Observer(Config(metrics=MetricsSettings(enabled=False))).metrics is None


def test_access_fields_name_every_step_and_never_the_query() -> None:
    exchange = Exchange(start=1.0, method="GET", path="/repos/x", route="gh", upstream="api.example:443",
                        status=200, request_id=b"abc", sent=1.001, first_event=1.002, connect_start=1.002,
                        connect_end=1.003, tls_start=1.003, tls_end=1.005, headers=1.010, end=1.020,
                        bytes_in=5, bytes_out=7, reused=False)
    fields = access_fields(exchange)
    assert fields == {
        "request_id": "abc", "route": "gh", "upstream": "api.example:443", "method": "GET", "path": "/repos/x",
        "status": 200, "kind": None, "duration_ms": 20.0, "headers_ms": 9.0, "pool_wait_ms": 1.0,
        "connect_ms": 1.0, "tls_ms": 2.0, "bytes_in": 5, "bytes_out": 7, "reused": False,
    }


def test_log_lines_are_batched_inside_a_loop_and_written_at_once_outside() -> None:
    stream = io.BytesIO()
    output = log_module.BufferedOutput(stream)
    output.write("a\n")  # no running loop: written now
    assert stream.getvalue() == b"a\n"

    async def inside() -> bytes:
        output.write("b\n")
        output.write("c\n")
        held = stream.getvalue()
        deadline = time.monotonic() + 5
        while stream.getvalue() == held and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # yield to the loop until its flush timer has run
        return held

    assert asyncio.run(inside()) == b"a\n"
    assert stream.getvalue() == b"a\nb\nc\n"


@pytest.fixture
def json_log() -> io.BytesIO:
    stream = io.BytesIO()
    log_module.configure(Log(format="json"), stream=stream)
    yield stream
    log_module.configure(Log(format="json"))


def test_a_log_line_is_json_with_an_iso_utc_time(json_log: io.BytesIO) -> None:
    log_module.get("t").info("hello", n=1)
    log_module.flush()
    line = json.loads(json_log.getvalue().decode().splitlines()[-1])
    assert line["event"] == "hello" and line["n"] == 1 and line["level"] == "info"
    assert len(line["time"]) == len("2026-01-01T00:00:00.000Z") and line["time"].endswith("Z")


def test_a_failed_connect_is_not_an_opened_connection() -> None:
    obs = observer()
    exchange = Exchange(start=time.perf_counter(), method="GET", path="/x", route="r", upstream="a:443")
    obs.started(exchange)
    exchange.mark_sent()
    _trace(exchange, "connection.connect_tcp.started", "connection.connect_tcp.failed")
    exchange.kind, exchange.status, exchange.end = "connect_error", 502, time.perf_counter()
    obs.finished(exchange)
    labels = {"route": "r", "upstream": "a:443"}
    assert sample(obs, "egress_upstream_connections_opened_total", **labels) == 0
    assert sample(obs, "egress_requests_on_reused_connection_total", **labels) == 0
    assert sample(obs, "egress_errors_total", kind="connect_error", **labels) == 1


def test_a_transport_that_only_reports_reuse_still_counts_opens() -> None:
    obs = observer()
    for reused in (False, True):
        exchange = Exchange(start=time.perf_counter(), method="GET", path="/x", route="r", upstream="a:443")
        exchange.mark_sent()
        exchange.reused = reused  # from the response's `egress.reused` extension, no trace events
        exchange.end = time.perf_counter()
        obs.finished(exchange)
    labels = {"route": "r", "upstream": "a:443"}
    assert sample(obs, "egress_upstream_connections_opened_total", **labels) == 1
    assert sample(obs, "egress_requests_on_reused_connection_total", **labels) == 1


# -- exposition of known exchanges -----------------------------------------------------------
# Every timing below is a sum of powers of two, so the differences and the sums are exact and
# a value meant to sit on a bucket bound (0.25, 0.5, 30) really does.

KNOWN = {"route": "gh", "upstream": "api.example:443"}


def known_metrics() -> Metrics:
    metrics = Metrics(Config(), lambda: 3)
    common = {"path": "/x", "route": "gh", "upstream": "api.example:443", "sent": 1.0}
    exchanges = [
        # reused connection: 2**-10 s pool wait, 0.25 s to headers (on a bound), 0.25 s in all
        Exchange(start=0.0, end=0.25, method="GET", status=200, headers=1.25, first_event=1.0009765625,
                 reused=True, bytes_out=100, **common),  # type: ignore[arg-type]
        # new connection: connect 2**-10 s (under 0.001), TLS 2**-9 s (0.0025 bucket)
        Exchange(start=0.0, end=0.375, method="GET", status=200, headers=1.25, first_event=1.0,
                 connect_start=1.0, connect_end=1.0009765625, tls_start=1.0009765625, tls_end=1.0029296875,
                 connects=1, reused=False, bytes_in=10, bytes_out=50, **common),  # type: ignore[arg-type]
        Exchange(start=0.0, end=0.5, method="POST", status=201, headers=1.5, first_event=1.0, reused=True,
                 bytes_in=7, **common),  # type: ignore[arg-type]
        Exchange(start=0.0, end=30.0, method="BREW", status=200, headers=1.5, first_event=1.0, reused=True,
                 **common),  # type: ignore[arg-type]
        Exchange(start=0.0, end=32.0, method="GET", status=502, first_event=1.0, connect_start=1.0,
                 kind="connect_error", **common),  # type: ignore[arg-type]
        Exchange(start=0.0, end=0.0009765625, method="GET", status=403, kind="denied_host",
                 path="/x", route="gh", upstream="api.example:443"),
    ]
    for exchange in exchanges:
        metrics.record(exchange)
    return metrics


def egress_families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)
            if family.name.startswith("egress_")}


DURATION_TEXT = """\
# HELP egress_request_duration_seconds Time from the request's arrival to the last response byte sent to the app
# TYPE egress_request_duration_seconds histogram
egress_request_duration_seconds_bucket{le="0.001",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.0025",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.005",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.01",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.025",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.05",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.1",route="gh",upstream="api.example:443"} 1.0
egress_request_duration_seconds_bucket{le="0.25",route="gh",upstream="api.example:443"} 2.0
egress_request_duration_seconds_bucket{le="0.5",route="gh",upstream="api.example:443"} 4.0
egress_request_duration_seconds_bucket{le="1.0",route="gh",upstream="api.example:443"} 4.0
egress_request_duration_seconds_bucket{le="2.5",route="gh",upstream="api.example:443"} 4.0
egress_request_duration_seconds_bucket{le="5.0",route="gh",upstream="api.example:443"} 4.0
egress_request_duration_seconds_bucket{le="10.0",route="gh",upstream="api.example:443"} 4.0
egress_request_duration_seconds_bucket{le="30.0",route="gh",upstream="api.example:443"} 5.0
egress_request_duration_seconds_bucket{le="+Inf",route="gh",upstream="api.example:443"} 6.0
egress_request_duration_seconds_count{route="gh",upstream="api.example:443"} 6.0
egress_request_duration_seconds_sum{route="gh",upstream="api.example:443"} 63.1259765625
"""


def test_a_histogram_is_exposed_with_values_on_a_bound_counted_in_that_bucket() -> None:
    _, body = known_metrics().exposition("text/plain")
    lines = body.decode().splitlines(keepends=True)
    duration = "".join(line for line in lines if "egress_request_duration_seconds" in line)
    assert duration == DURATION_TEXT


def test_known_exchanges_give_these_counts_sums_and_counters() -> None:
    _, body = known_metrics().exposition("text/plain")
    families = egress_families(body.decode())
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in families.values() for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return values[(name, tuple(sorted({**KNOWN, **labels}.items())))]

    def buckets(family: str) -> list[float]:
        return [value(f"{family}_bucket", le=le) for le in ("0.001", "0.0025", "0.25", "0.5", "30.0", "+Inf")]

    assert families["egress_requests"].type == "counter"
    assert families["egress_request_duration_seconds"].type == "histogram"
    requests = {(s.labels["method"], s.labels["code"]): s.value for s in families["egress_requests"].samples}
    assert requests == {("GET", "200"): 2, ("POST", "201"): 1, ("OTHER", "200"): 1, ("GET", "502"): 1,
                        ("GET", "403"): 1}
    # headers - sent: 0.25 (on the bound) twice, 0.5 (on the bound) twice
    assert buckets("egress_upstream_response_seconds") == [0, 0, 2, 4, 4, 4]
    assert value("egress_upstream_response_seconds_sum") == 1.5
    # first_event - sent: 2**-10 once, 0 four times; the denial never reached the pool
    assert buckets("egress_pool_wait_seconds") == [5, 5, 5, 5, 5, 5]
    assert value("egress_pool_wait_seconds_sum") == 0.0009765625
    assert buckets("egress_upstream_connect_seconds") == [1, 1, 1, 1, 1, 1]
    assert buckets("egress_upstream_tls_handshake_seconds") == [0, 1, 1, 1, 1, 1]
    assert value("egress_upstream_tls_handshake_seconds_count") == 1
    assert value("egress_upstream_tls_handshake_seconds_sum") == 0.001953125
    assert value("egress_upstream_connections_opened_total") == 1
    assert value("egress_requests_on_reused_connection_total") == 3
    assert value("egress_request_bytes_total") == 17
    assert value("egress_response_bytes_total") == 150
    assert value("egress_errors_total", kind="connect_error") == 1
    assert value("egress_errors_total", kind="denied_host") == 1
    denied = {(s.labels["route"], s.labels["reason"]): s.value for s in families["egress_denied"].samples}
    assert denied == {**{("-", reason): 0 for reason in REASONS}, ("gh", "denied_host"): 1}
    assert [s.value for s in families["egress_requests_in_flight"].samples] == [3]
    # No `_created` series, in either format.
    assert "_created" not in body.decode()
    assert b"_created" not in known_metrics().exposition("application/openmetrics-text")[1]


def test_every_design_family_is_exposed_before_any_request() -> None:
    metrics = Metrics(Config(), lambda: 0, lambda: {"default": (0, 0)})
    families = egress_families(metrics.exposition("text/plain")[1].decode())
    assert {name: family.type for name, family in families.items()} == {
        "egress_requests": "counter", "egress_requests_in_flight": "gauge",
        "egress_request_duration_seconds": "histogram", "egress_upstream_response_seconds": "histogram",
        "egress_pool_wait_seconds": "histogram", "egress_upstream_connect_seconds": "histogram",
        "egress_upstream_tls_handshake_seconds": "histogram", "egress_upstream_connections_opened": "counter",
        "egress_requests_on_reused_connection": "counter", "egress_request_bytes": "counter",
        "egress_response_bytes": "counter", "egress_intercepted_requests": "counter", "egress_errors": "counter", "egress_denied": "counter",
        "egress_retries": "counter", "egress_build_info": "gauge", "egress_upstream_connections": "gauge",
        "egress_upstream_connections_limit": "gauge", "egress_would_deny": "counter",
        "egress_config_info": "gauge", "egress_config_reloads": "counter",
        "egress_tunnels": "counter", "egress_tunnels_active": "gauge", "egress_tunnel_bytes": "counter",
        "egress_tunnel_duration_seconds": "histogram",
    }


def test_the_openmetrics_exposition_carries_the_same_samples() -> None:
    metrics = known_metrics()
    metrics.retry("gh", "reset")
    text = egress_families(metrics.exposition("text/plain")[1].decode())
    open_metrics = {family.name: family for family in
                    openmetrics_families(metrics.exposition("application/openmetrics-text")[1].decode())
                    if family.name.startswith("egress_")}
    # The info family is an `info` named egress_build in OpenMetrics, a gauge egress_build_info in text.
    assert open_metrics.pop("egress_build").type == "info" and text.pop("egress_build_info").type == "gauge"
    assert set(open_metrics) == set(text)
    for name, family in text.items():
        assert open_metrics[name].type == family.type
        assert open_metrics[name].documentation == family.documentation
        assert [(s.name, s.labels, s.value) for s in open_metrics[name].samples] == \
            [(s.name, s.labels, s.value) for s in family.samples]


def test_known_exchanges_pass_promtool() -> None:
    metrics = known_metrics()
    metrics.retry("gh", "503")
    # `promtool check metrics` reads the text format only (it calls OpenMetrics' `info` unknown).
    result = promtool_check(metrics.exposition("text/plain")[1].decode())
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_registry_refuses_a_second_family_of_a_hot_name() -> None:
    metrics = known_metrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("egress_requests", "again", registry=metrics.registry)
