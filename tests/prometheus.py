"""Test helpers for metrics: parse a /metrics scrape, and run a real Prometheus server."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import stop_process
from tests.upstream import wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(admin_url: str, accept: str | None = None) -> str:
    headers = {"accept": accept} if accept else {}
    response = httpx.get(f"{admin_url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return response.text


def samples(text: str) -> Samples:
    """Every sample of a text-format scrape, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(found: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over the samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, got), value in found.items() if sample == name and wanted <= got)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "metrics"], check=False, input=text, capture_output=True,
                          text=True, timeout=30)


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def query(self, expr: str) -> dict[str, Any]:
        """An instant query; the API's JSON (`status`, `data`, `error`) as it answered."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def value(self, expr: str) -> float | None:
        """The single value of a scalar-like query, or None while it has no result."""
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        if not result:
            return None
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def stop(self) -> None:
        stop_process(self.proc)


def start_prometheus(tmp_path: Path, port: int, target: str | list[str], interval: str = "1s") -> Prometheus:
    """Start /usr/bin/prometheus on 127.0.0.1:`port` scraping `target` (host:port, or several) every `interval`."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "egress-sidecar", "scrape_interval": interval, "scrape_timeout": interval,
                            "static_configs": [{"targets": [target] if isinstance(target, str) else target}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    server = Prometheus(proc, f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=20, interval=0.05, message="prometheus ready")
    except BaseException:
        server.stop()
        raise
    return server
