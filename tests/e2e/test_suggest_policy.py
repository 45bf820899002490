"""`egress-sidecar suggest-policy` end to end: two sidecars in report mode see known traffic; the
policy suggested from their admin URLs, from a saved /destinations file, and from a real
Prometheus that scraped both passes `check-config`, and loaded in enforce mode it lets exactly
the observed traffic through and refuses a new host."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from tests.conftest import ROOT, Sidecar, free_port, server_context
from tests.e2e.test_inventory import tunnel_get
from tests.prometheus import start_prometheus
from tests.servers.upstream import Upstream, UpstreamServer, wait_until

NAMES = ["localhost", "api.test", "a.svc.test", "b.svc.test", "c.svc.test", "new.test", "d.svc.test"]
OBSERVED = {  # sidecar index -> forward-proxy hosts it is asked for
    0: ["api.test", "a.svc.test"],
    1: ["b.svc.test", "c.svc.test", "api.test"],
}
SUGGESTED = ["api.test", "localhost", "*.svc.test"]  # collapse 3: a, b, c.svc.test share svc.test


@pytest.fixture
def named_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    server = UpstreamServer(server_context(ca, *NAMES))
    yield server.start()
    server.stop()


def fleet_config(port: int, **policy: Any) -> dict[str, Any]:
    return {
        "policy": {"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [port], **policy},
        "resolve": {name: "127.0.0.1" for name in NAMES if name != "localhost"},
    }


def suggest(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sidecar", "suggest-policy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_config(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / f"suggested-{free_port()}.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and ": ok" in done.stdout, done.stderr
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def forward(sidecar: Sidecar, host: str, port: int) -> tuple[int, str | None]:
    with sidecar.client(timeout=10) as client:
        response = client.get(f"http://{host}:{port}/bytes?n=8")
    return response.status_code, response.headers.get("x-egress-error")


def test_suggested_policy_lets_exactly_the_observed_traffic_through(
    make_sidecar: Callable[..., Sidecar], named_upstream: Upstream, ca_file: str, tmp_path: Path,
) -> None:
    port = named_upstream.port
    fleet = [make_sidecar(**fleet_config(port, mode="report", default="deny")) for _ in OBSERVED]
    (tmp_path / "prom").mkdir()
    prometheus = start_prometheus(tmp_path / "prom", free_port(), [f"127.0.0.1:{s.admin_port}" for s in fleet])
    try:
        for index, hosts in OBSERVED.items():
            for host in hosts:
                assert forward(fleet[index], host, port) == (200, None)  # would-deny, forwarded
        assert tunnel_get(fleet[0], f"localhost:{port}", "localhost", ca_file) == 200
        # Refused by an address rule (the sidecar's own admin port): never suggested.
        assert forward(fleet[1], "0x7f.1", fleet[1].admin_port)[0] == 403

        wanted = len(OBSERVED[0]) + len(OBSERVED[1]) + 1
        wait_until(lambda: prometheus.value('sum(egress_requests_total{route="-"})') == wanted
                   and prometheus.value("sum(egress_tunnels_total)") == 1, 20, interval=0.2,
                   message="prometheus scraped both sidecars")

        saved = tmp_path / "fleet0-destinations.json"
        saved.write_text(httpx.get(f"{fleet[0].admin_url}/destinations", timeout=5).text)
        suggestions = {
            "admin URLs": suggest(fleet[0].admin_url, fleet[1].admin_url, "--collapse", "3"),
            "a saved file and a URL": suggest(str(saved), f"{fleet[1].admin_url}/destinations", "--collapse", "3"),
            "prometheus": suggest("--prometheus", prometheus.url, "--window", "10m", "--collapse", "3"),
        }
    finally:
        prometheus.stop()
    for source, text in suggestions.items():
        block = check_config(tmp_path, text)["policy"]
        assert sorted(block["allow_hosts"]) == sorted(SUGGESTED), (source, text)
        assert block["connect_ports"] == [port] and block["mode"] == "enforce" and block["default"] == "deny"
        assert "0x7f.1" not in str(block["allow_hosts"])
        assert "WOULD-DENY not_allowed" in text, source
    assert "# not allowed: 127.0.0.1" in suggestions["admin URLs"]

    # Enforce the suggestion: everything observed goes through, a new host does not.
    policy = yaml.safe_load(suggestions["prometheus"])["policy"]
    # (allow_cidrs: the test's upstream is on loopback; the suggestion is about names, not addresses)
    enforcing = make_sidecar(**{**fleet_config(port), "policy": {**policy, "allow_cidrs": ["127.0.0.0/8"]}})
    for hosts in OBSERVED.values():
        for host in hosts:
            assert forward(enforcing, host, port) == (200, None), host
    assert tunnel_get(enforcing, f"localhost:{port}", "localhost", ca_file) == 200
    assert forward(enforcing, "new.test", port) == (403, "denied_host")
    assert tunnel_get(enforcing, f"new.test:{port}", "new.test", ca_file) == 403
