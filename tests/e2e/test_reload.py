"""Config reload without restart, through the real sidecar: a ConfigMap volume updated the way the
kubelet does it (new `..data` directory, symlink renamed over), SIGHUP, certificate files that
change under a route, invalid configs, listener changes, and all of it under load."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from tests.conftest import ROOT, Sidecar, base_config, server_context, start_sidecar
from tests.k8s_secret import create_secret_volume, rotate_secret_volume
from tests.processes import stop_process
from tests.servers.upstream import Upstream, UpstreamServer, wait_until

VISIBLE = 2.0  # seconds: how soon a change must be seen


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def other_upstream(other_ca: trustme.CA) -> Iterator[Upstream]:
    """A TLS upstream whose certificate the session CA does not vouch for (a second CA)."""
    server = UpstreamServer(server_context(other_ca))
    yield server.start()
    server.stop()


@pytest.fixture
def other_ca_file(other_ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    other_ca.cert_pem.write_to_path(str(path))
    return str(path)


class Mounted:
    """A sidecar whose config is a ConfigMap-style volume, and the ways to change it."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.volume = tmp_path / "configmap"
        self.config = config
        create_secret_volume(self.volume, {"config.yaml": yaml.safe_dump(config)})
        self.sidecar = start_sidecar(tmp_path, config, config_path=self.volume / "config.yaml")

    def swap(self, config: dict[str, Any] | str) -> None:
        """Update the volume as the kubelet does (atomic `..data` rename)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        if not isinstance(config, str):
            self.config = config
        rotate_secret_volume(self.volume, {"config.yaml": text})

    def stop(self) -> None:
        stop_process(self.sidecar.proc)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Any]:
    started: list[Mounted] = []

    def make(config: dict[str, Any]) -> Mounted:
        started.append(Mounted(tmp_path, config))
        return started[-1]

    yield make
    for one in started:
        one.stop()


def get(sidecar: Sidecar, path: str) -> tuple[int, str | None]:
    response = httpx.get(f"{sidecar.url}{path}", timeout=10, trust_env=False)
    return response.status_code, response.headers.get("x-egress-error")


def proxied(sidecar: Sidecar, url: str) -> tuple[int, str | None]:
    with sidecar.client(timeout=10) as client:
        response = client.get(url)
    return response.status_code, response.headers.get("x-egress-error")


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def active_sha(sidecar: Sidecar) -> str:
    return str(httpx.get(f"{sidecar.admin_url}/config", timeout=5).json()["sha256"])


def visible(check: Any, what: str) -> float:
    """Wait (at most VISIBLE seconds) until `check()` holds; returns how long it took."""
    started = time.monotonic()
    wait_until(check, VISIBLE, interval=0.05, message=what)
    return time.monotonic() - started


def route(name: str, upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"name": name, "prefix": f"/{name}", "upstream": f"https://localhost:{upstream.port}", **extra}


def test_reload_under_load_applies_each_valid_change_and_rejects_the_invalid_one(
    mounted: Any, ca_file: str, upstream: Upstream, other_upstream: Upstream, other_ca_file: str, tmp_path: Path,
) -> None:
    both = tmp_path / "both-cas.pem"
    both.write_text(Path(ca_file).read_text() + Path(other_ca_file).read_text())
    config = base_config(ca_file, routes=[route("up", upstream, tls={"ca_file": ca_file})],
                         resolve={"upstream.test": "127.0.0.1"})
    m = mounted(config)
    sidecar = m.sidecar
    first_sha = active_sha(sidecar)
    assert metric(sidecar, "egress_config_info", sha256=first_sha) == 1
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.load_client", "--base", sidecar.url, "--prefix", "/up", "--total", "1000000",
         "--concurrency", "32", "--seconds", "10", "--mix", "ok"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    took: dict[str, float] = {}
    try:
        wait_until(lambda: metric(sidecar, "egress_requests_total", route="up", code="200") > 50, 10,
                   message="load under way")
        # 1. A route is added (its upstream's CA is not trusted yet: it answers, with tls_error).
        assert get(sidecar, "/extra/bytes?n=5") == (404, "no_route")
        step = copy.deepcopy(config)
        step["routes"].append(route("extra", other_upstream, tls={"ca_file": ca_file}))
        m.swap(step)
        took["add a route"] = visible(lambda: get(sidecar, "/extra/bytes?n=5") == (502, "tls_error"), "new route")
        # 2. The policy changes: default deny, only the route's host allowed.
        assert proxied(sidecar, f"http://upstream.test:{upstream.port}/bytes?n=5") == (200, None)
        step = copy.deepcopy(step)
        step["policy"] = {**step["policy"], "default": "deny", "allow_hosts": ["localhost"]}
        m.swap(step)
        took["change the policy"] = visible(
            lambda: proxied(sidecar, f"http://upstream.test:{upstream.port}/bytes?n=5") == (403, "denied_host"),
            "policy change")
        # 3. Routes' CAs change: `extra` now trusts its upstream; the loaded route `up` gets a
        #    bundle (a new pool for it; the old one drains under the load).
        step = copy.deepcopy(step)
        step["routes"][0]["tls"] = {"ca_file": str(both)}
        step["routes"][1]["tls"] = {"ca_file": other_ca_file}
        m.swap(step)
        took["change a route's CA"] = visible(lambda: get(sidecar, "/extra/bytes?n=5") == (200, None), "CA change")
        applied_sha = active_sha(sidecar)
        # 4. An invalid file: rejected, the key named, the last good config still serving.
        invalid = copy.deepcopy(step)
        invalid["routes"][1]["prefix"] = "no-slash"
        m.swap(invalid)
        line = sidecar.wait_log(lambda e: e.get("event") == "config_rejected", VISIBLE)
        assert "routes[1].prefix" in line["error"]
        assert metric(sidecar, "egress_config_reloads_total", outcome="rejected") == 1
        assert active_sha(sidecar) == applied_sha and get(sidecar, "/extra/bytes?n=5") == (200, None)
        # 5. A valid one again: the extra route moves.
        step = copy.deepcopy(step)
        step["routes"][1]["prefix"] = "/moved"
        m.swap(step)
        took["a valid one"] = visible(lambda: get(sidecar, "/moved/bytes?n=5") == (200, None), "route moved")
        assert get(sidecar, "/extra/bytes?n=5") == (404, "no_route")
        out, err = load.communicate(timeout=30)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(5)
    summary = json.loads(out)
    assert set(summary["outcomes"]) == {"ok_ok"}, (summary, err)  # zero failed requests
    assert summary["sent"] > 200 and summary["seconds"] >= 9, summary
    assert metric(sidecar, "egress_config_reloads_total", outcome="applied") == 4
    final_sha = active_sha(sidecar)
    assert final_sha not in (first_sha, applied_sha) and metric(sidecar, "egress_config_info", sha256=final_sha) == 1
    assert metric(sidecar, "egress_config_info", sha256=first_sha) == 0
    # The loaded route's old pool was closed once its requests were done.
    sidecar.wait_log(lambda e: e.get("event") == "pools_retired", 10)
    print("visible after:", {key: round(value, 2) for key, value in took.items()})


def test_a_request_in_flight_finishes_under_the_config_it_started_with(
    mounted: Any, ca_file: str, upstream: Upstream
) -> None:
    config = base_config(ca_file, routes=[route("up", upstream), route("slow", upstream)])
    m = mounted(config)
    sidecar = m.sidecar
    with httpx.Client(base_url=sidecar.url, timeout=20, trust_env=False) as client, \
            client.stream("GET", "/slow/slow?n=20&interval=0.1") as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        received = len(next(chunks))
        m.swap({**config, "routes": [route("up", upstream)]})  # the route it runs on goes away
        wait_until(lambda: get(sidecar, "/slow/bytes?n=1") == (404, "no_route"), VISIBLE, message="route removed")
        received += sum(len(chunk) for chunk in chunks)
    assert received == 20 * 1024


def test_sighup_reloads_and_a_listener_change_needs_a_restart(mounted: Any, ca_file: str, upstream: Upstream) -> None:
    config = base_config(ca_file, routes=[route("up", upstream)])
    m = mounted(config)
    sidecar = m.sidecar
    changed = copy.deepcopy(config)
    changed["listen"]["port"] = config["listen"]["port"] + 1 if config["listen"]["port"] < 65535 else 1024
    changed["routes"].append(route("added", upstream))
    changed["log"] = {**config["log"], "level": "warning"}
    changed["limits"] = {"max_request_line": 200}
    # Written in place (no watcher event can be relied on first): SIGHUP makes it apply.
    (m.volume / "config.yaml").resolve().write_text(yaml.safe_dump(changed))
    sidecar.proc.send_signal(signal.SIGHUP)
    sidecar.wait_log(lambda e: e.get("event") == "config_reloaded", VISIBLE)
    restart = sidecar.wait_log(lambda e: e.get("event") == "config_restart_needed", VISIBLE)
    assert restart["keys"] == ["listen"]
    assert get(sidecar, "/added/bytes?n=3") == (200, None)  # the rest applied, on the old port
    assert get(sidecar, "/up/bytes?n=3&pad=" + "a" * 300) == (414, "uri_too_long")  # head limits too
    shown = httpx.get(f"{sidecar.admin_url}/config", timeout=5).json()
    assert shown["listen"]["port"] == config["listen"]["port"] and [r["name"] for r in shown["routes"]] == [
        "up", "added"]
    # log.level warning applies too: access lines stop.
    before = len([e for e in sidecar.logs() if e.get("event") == "access"])
    assert get(sidecar, "/up/bytes?n=3") == (200, None)
    assert get(sidecar, "/nothing") == (404, "no_route")  # an error line still comes, after the access line would
    sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("path") == "/nothing", 5)
    assert len([e for e in sidecar.logs() if e.get("event") == "access"]) == before
    assert any(e.get("event") == "config_reloaded" and e.get("trigger") == "signal" for e in sidecar.logs())


def test_a_route_ca_file_replaced_on_disk_is_reloaded(
    mounted: Any, ca: trustme.CA, other_ca: trustme.CA, other_upstream: Upstream, tmp_path: Path, ca_file: str
) -> None:
    # The route's trust is a mounted Secret (kubelet-style): first the wrong CA, then the right one.
    trust = tmp_path / "route-ca"
    create_secret_volume(trust, {"ca.pem": ca.cert_pem.bytes().decode()})
    config = base_config(ca_file, routes=[route("other", other_upstream, tls={"ca_file": str(trust / "ca.pem")})])
    m = mounted(config)
    assert get(m.sidecar, "/other/bytes?n=4") == (502, "tls_error")
    rotate_secret_volume(trust, {"ca.pem": other_ca.cert_pem.bytes().decode()})
    visible(lambda: get(m.sidecar, "/other/bytes?n=4") == (200, None), "route CA re-read")
    line = m.sidecar.wait_log(lambda e: e.get("event") == "config_reloaded", 5)
    assert line["files"] == [str(trust / "ca.pem")] and line["pools_replaced"] == 1
    # A CA file that no longer loads: rejected, the key named, the last good pool keeps serving.
    rotate_secret_volume(trust, {"ca.pem": "not a certificate\n"})
    line = m.sidecar.wait_log(lambda e: e.get("event") == "config_rejected", VISIBLE)
    assert "routes[0].tls.ca_file" in line["error"]
    assert get(m.sidecar, "/other/bytes?n=4") == (200, None)
