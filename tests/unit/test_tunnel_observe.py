"""What a tunnel reports: its log line's fields, its metric families, its denials. Pure parts."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Config
from sidecar.config import MetricsSettings as MetricsConfig
from sidecar.observe.access_log import tunnel_fields
from sidecar.observe.metrics import Metrics
from sidecar.policy.egress import PolicyDenied
from sidecar.tunnel.tunnels import REFUSALS, TunnelRecord


def record(outcome: str = "closed", host: str = "api.example.com", **fields: object) -> TunnelRecord:
    rec = TunnelRecord(start=100.0, host=host, port=443, address="203.0.113.7", sni=host,
                       connect_start=100.001, connect_end=100.003, bytes_up=1200, bytes_down=50_000,
                       outcome=outcome, end=102.5)
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def samples(metrics: Metrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.exposition("text/plain")[1].decode()
    found = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


def test_tunnel_line_uses_the_access_keys_where_they_mean_the_same() -> None:
    fields = tunnel_fields(record())
    assert fields == {
        "route": "-", "upstream": "api.example.com:443", "method": "CONNECT", "path": "api.example.com:443",
        "status": 200, "duration_ms": 2500.0, "connect_ms": 2.0, "bytes_in": 1200, "bytes_out": 50_000,
        "address": "203.0.113.7", "sni": "api.example.com", "outcome": "closed",
    }


def test_tunnel_metrics_count_outcomes_bytes_and_duration() -> None:
    metrics = Metrics(Config(), lambda: 0)
    metrics.tunnel(record())
    metrics.tunnel(record("idle_timeout"))
    assert samples(metrics, "egress_tunnels_total") == {
        (("outcome", "closed"), ("upstream", "api.example.com:443")): 1,
        (("outcome", "idle_timeout"), ("upstream", "api.example.com:443")): 1,
    }
    assert samples(metrics, "egress_tunnel_bytes_total") == {
        (("direction", "up"), ("upstream", "api.example.com:443")): 2400,
        (("direction", "down"), ("upstream", "api.example.com:443")): 100_000,
    }
    buckets = samples(metrics, "egress_tunnel_duration_seconds_bucket")
    assert buckets[(("le", "1.0"),)] == 0 and buckets[(("le", "10.0"),)] == 2
    assert samples(metrics, "egress_tunnel_duration_seconds_sum") == {(): 5.0}
    assert samples(metrics, "egress_tunnels_active") == {(): 0}


def test_refusals_after_the_200_count_as_denials_by_reason() -> None:
    metrics = Metrics(Config(), lambda: 0)
    for outcome in sorted(REFUSALS):
        metrics.tunnel(record(outcome, bytes_up=0, bytes_down=0))
    metrics.tunnel(record("bad_hello"))  # malformed, not a policy decision: an outcome only
    denied = samples(metrics, "egress_denied_total")
    assert {labels: value for labels, value in denied.items() if value} == {
        (("reason", reason), ("route", "-")): 1 for reason in REFUSALS
    }


def test_tunnel_upstream_label_is_capped_like_requests() -> None:
    metrics = Metrics(Config(metrics=MetricsConfig(max_upstreams=2)), lambda: 0)
    for index in range(5):
        metrics.tunnel(record(host=f"h{index}.example"))
    upstreams = {dict(labels)["upstream"] for labels in samples(metrics, "egress_tunnels_total")}
    assert upstreams == {"h0.example:443", "h1.example:443", "other"}


def test_active_gauge_reads_the_open_tunnels_at_scrape_time() -> None:
    class Open:
        active = 7

    metrics = Metrics(Config(), lambda: 0)
    tunnels = Open()
    metrics.watch_tunnels(lambda: tunnels.active)
    assert samples(metrics, "egress_tunnels_active") == {(): 7}


def test_denied_port_names_the_target_and_the_reason() -> None:
    denial = PolicyDenied("denied_port", "port", "api.example.com:8443")
    assert (denial.kind, denial.reason) == ("denied_port", "port")
    assert denial.subject == "api.example.com:8443 is not a port CONNECT may reach (policy.connect_ports)"
