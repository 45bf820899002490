"""What an operator sees at start and stop: one line per step, a second signal that ends it now,
and a port already taken reported as one `startup_failed` line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, Sidecar, base_config
from tests.servers.upstream import Upstream


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_second_signal_ends_a_streaming_sidecar_within_a_second(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, signum: int, code: int
) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}],
        drain={"grace": "30s"},
    )
    first_byte = threading.Event()
    outcome: dict[str, str] = {}

    def download() -> None:  # 60 s of body: 600 chunks, one every 0.1 s
        try:
            with httpx.stream("GET", f"{sidecar.url}/up/slow?n=600&interval=0.1", timeout=30) as response:
                for _ in response.iter_raw():
                    first_byte.set()
            outcome["result"] = "complete"
        except httpx.HTTPError as exc:
            outcome["result"] = f"cut: {type(exc).__name__}"

    thread = threading.Thread(target=download)
    thread.start()
    assert first_byte.wait(10)
    sidecar.proc.send_signal(signum)
    sidecar.wait_log(lambda e: e.get("event") == "draining")
    assert sidecar.proc.poll() is None  # the first signal drains: the stream keeps the sidecar up
    forced = time.monotonic()
    sidecar.proc.send_signal(signum)
    assert sidecar.proc.wait(5) == code
    assert time.monotonic() - forced < 1.0
    thread.join(10)
    assert outcome["result"].startswith("cut")
    line = next(e for e in sidecar.logs() if e.get("event") == "forced_exit")
    assert (line["exit_code"], line["in_flight"], line["signal"]) == (code, 1, signal.Signals(signum).name)


def test_port_in_use_is_one_startup_failed_line(ca_file: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = base_config(ca_file, listen={"port": port})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    lines = [yaml.safe_load(line) for line in result.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["starting", "startup_failed"], result.stdout
    failed = lines[1]
    assert failed["level"] == "error" and failed["listen"] == f"127.0.0.1:{port}"
    assert f"('127.0.0.1', {port})" in failed["error"] and "address already in use" in failed["error"]


def test_start_ready_drain_stop_are_one_line_each_and_uvicorn_prints_none(
    make_sidecar: Callable[..., Sidecar],
) -> None:
    sidecar = make_sidecar()
    assert sidecar.terminate() == 0
    lines = sidecar.logs()
    assert len(lines) == len(sidecar.log_path.read_text().splitlines())  # every line is ours, in JSON
    events = [line["event"] for line in lines]
    for event in ("starting", "started", "draining", "stopped"):
        assert events.count(event) == 1, events
    assert events.index("starting") < events.index("started") < events.index("draining") < events.index("stopped")
    assert not [line for line in lines if str(line.get("logger", "")).startswith("uvicorn")]
    assert lines[-1]["drain"] == "complete" and lines[-1]["in_flight_cut"] == 0

