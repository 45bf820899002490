"""A real Prometheus scrapes the sidecar: known traffic comes back as exact counts, and every
PromQL expression of the shipped Grafana dashboard runs and has data."""

from __future__ import annotations

import json
import math
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, Sidecar, free_port
from tests.e2e.test_metrics import closed_port
from tests.prometheus import Prometheus, start_prometheus
from tests.upstream import Upstream, random_bytes, wait_until

DASHBOARD = ROOT / "helm" / "egress-sidecar" / "files" / "grafana-dashboard.json"

# Grafana's variables, as the dashboard's defaults resolve them: all routes, a window that
# holds several 1 s scrapes.
VARIABLES = {"$__rate_interval": "1m", "$route": ".*"}


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):  # a row has none
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unknown variable in {panel['title']!r}: {expr}"
            found.append((f"{panel['title']} / {target['refId']}", expr))
    return found


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[Sidecar], Prometheus]]:
    started: list[Prometheus] = []

    def start(sidecar: Sidecar) -> Prometheus:
        server = start_prometheus(tmp_path / "prometheus", free_port(), f"127.0.0.1:{sidecar.admin_port}")
        started.append(server)
        return server

    (tmp_path / "prometheus").mkdir()
    yield start
    for server in started:
        server.stop()


def test_prometheus_counts_known_traffic_and_runs_every_dashboard_query(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, prometheus_for: Callable[[Sidecar], Prometheus],
    ca_file: str,
) -> None:
    ca_context = ssl.create_default_context(cafile=ca_file)
    dead_port, unlisted_port = closed_port(), closed_port()
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"},
                {"name": "dead", "prefix": "/dead", "upstream": f"https://localhost:{dead_port}"}],
        # Only the test upstream's loopback address is allowed: 127.0.0.2 is a policy denial
        # (denied_ip) once the egress policy enforces ranges; before that, a refused connect.
        policy={"allow_cidrs": ["127.0.0.1/32", "::1/128"], "connect_ports": [upstream.port],
                # Report mode with the tunnels' host on the deny list: each tunnel is a would-deny
                # (the dashboard's rollout panel has data); routes ignore host rules.
                "mode": "report", "deny_hosts": ["localhost"]},
    )
    prometheus = prometheus_for(sidecar)
    kinds: Counter[str] = Counter()
    successes, body_bytes, lock = 0, 0, threading.Lock()

    def record(response: httpx.Response) -> None:
        nonlocal successes, body_bytes
        with lock:
            kind = response.headers.get("x-egress-error")
            if kind is None:
                assert response.status_code == 200, response.text
                successes += 1
                body_bytes += len(response.content)
            else:
                kinds[kind] += 1

    def errors(client: httpx.Client, m: int, k: int) -> None:
        for _ in range(m):
            record(client.get("/no/such/route"))  # no_route
        for _ in range(k):
            record(client.get("/dead/x"))  # connect_error: nothing listens on the route's port

    def tunnel() -> None:  # an https:// call through HTTPS_PROXY: a CONNECT tunnel, not a request
        with httpx.Client(proxy=sidecar.url, trust_env=False, timeout=10, verify=ca_context) as tunnelled:
            assert tunnelled.get(f"https://localhost:{upstream.port}/bytes?n=5000").content == random_bytes(5000, 1)

    with httpx.Client(base_url=sidecar.url, timeout=10) as client, \
            httpx.Client(proxy=sidecar.url, trust_env=False, timeout=10) as proxied:
        # Phase 1: one of each, then wait for a scrape, so the rates of phase 2 have a start point.
        record(client.get("/up/bytes?n=100"))
        errors(client, 1, 1)
        record(proxied.get(f"http://127.0.0.2:{unlisted_port}/x"))
        tunnel()
        wait_until(lambda: prometheus.value("sum(egress_requests_total)") == 4
                   and prometheus.value("sum(egress_tunnels_total)") == 1, timeout=20, interval=0.1,
                   message="prometheus scraped phase 1")

        # Phase 2: N successes from 8 concurrent clients (new connections: TLS handshakes),
        # M no_route, K connect errors, D requests to a range the policy denies.
        n_per_thread, threads_count, m, k, d = 5, 8, 6, 5, 3
        barrier = threading.Barrier(threads_count)

        def worker(index: int) -> None:
            with httpx.Client(base_url=sidecar.url, timeout=10) as own:
                barrier.wait(10)
                record(own.get("/up/slow?n=2&interval=0.05"))  # overlapping: each needs its own connection
                for request in range(n_per_thread - 1):
                    if request % 2:
                        record(own.post("/up/echo", content=b"y" * 300))
                    else:
                        record(own.get(f"/up/bytes?n={1000 + index}"))

        workers = [threading.Thread(target=worker, args=(index,)) for index in range(threads_count)]
        for thread in workers:
            thread.start()
        errors(client, m, k)
        for _ in range(d):
            record(proxied.get(f"http://127.0.0.2:{unlisted_port}/x"))
        tunnel()
        tunnel()
        # A CONNECT to a port outside policy.connect_ports: 403 denied_port, counted as a request.
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as raw:
            raw.sendall(f"CONNECT localhost:{unlisted_port} HTTP/1.1\r\n\r\n".encode())
            assert b"x-egress-error: denied_port" in raw.recv(65536)
            kinds["denied_port"] += 1
        for thread in workers:
            thread.join(30)

    sent = successes + sum(kinds.values())
    assert successes == 1 + n_per_thread * threads_count
    assert kinds["no_route"] == 1 + m
    assert sent == 4 + n_per_thread * threads_count + m + k + d + 1
    wait_until(lambda: prometheus.value("sum(egress_requests_total)") == sent, timeout=20, interval=0.1,
               message="prometheus scraped all the traffic")

    # Exact counts through Prometheus' query API.
    assert prometheus.value('sum(egress_requests_total{route="up",code="200"})') == successes
    assert prometheus.value('sum(egress_request_duration_seconds_count{route="up"})') == successes
    assert prometheus.value('sum(egress_response_bytes_total{route="up"})') == body_bytes
    assert prometheus.value('sum(egress_request_bytes_total{route="up"})') == 300 * threads_count * 2
    for kind, count in kinds.items():
        assert prometheus.value(f'sum(egress_errors_total{{kind="{kind}"}})') == count, kind
    assert prometheus.value("sum(egress_errors_total)") == sum(kinds.values())
    assert prometheus.value('sum(egress_errors_total{kind="connect_error",route="dead"})') == 1 + k
    denied = kinds["denied_ip"] + kinds["denied_host"] + kinds["denied_port"]
    assert prometheus.value("sum(egress_denied_total)") == denied
    assert prometheus.value('sum(egress_denied_total{reason="port"})') == 1
    wait_until(lambda: prometheus.value("sum(egress_tunnels_total)") == 3, timeout=20, interval=0.1,
               message="prometheus scraped the tunnels")
    assert prometheus.value('sum(egress_tunnel_duration_seconds_count)') == 3
    assert prometheus.value('sum(egress_tunnel_bytes_total{direction="down"})') > 3 * 5000
    assert prometheus.value("egress_tunnels_active") == 0
    assert prometheus.value('sum(egress_would_deny_total{reason="host_denied"})') == 3
    assert prometheus.value('sum(egress_config_reloads_total)') == 0 and prometheus.value("count(egress_config_info)") == 1
    # Every success went out on a new or a reused connection; the concurrent wave opened several.
    opened = prometheus.value('sum(egress_upstream_connections_opened_total{route="up"})')
    reused = prometheus.value('sum(egress_requests_on_reused_connection_total{route="up"})')
    assert opened is not None and reused is not None
    assert opened + reused == successes and opened >= 2
    assert prometheus.value('sum(egress_upstream_tls_handshake_seconds_count{route="up"})') == opened
    assert prometheus.value("egress_requests_in_flight") == 0
    assert prometheus.value("sum(egress_build_info)") == 1
    assert prometheus.value("process_resident_memory_bytes") is not None

    # Every expression of the dashboard: no error, a result, and numbers (no NaN from empty rates).
    failures = []
    for name, expr in dashboard_expressions():
        body = prometheus.query(expr)
        if body.get("status") != "success":
            failures.append(f"{name}: {body.get('error')}")
        elif not body["data"]["result"]:
            failures.append(f"{name}: empty result for {expr}")
        elif any(math.isnan(float(series["value"][1])) for series in body["data"]["result"]):
            failures.append(f"{name}: NaN in {body['data']['result']}")
    assert not failures, "\n".join(failures)
