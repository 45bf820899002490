"""The interception benchmark (bench/intercept_load.py) still works: one very short round.

Real pieces: upstream nginx, the sidecar intercepting `localhost`, the compiled CONNECT forwarder,
the aiohttp peer, wrk. Checks the byte-exact /1m through the intercepted path (the harness refuses
to measure otherwise), that every run finished without errors, and that the intercepted requests
were counted as such by the sidecar (so the numbers are of interception, not of a plain tunnel).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_the_interception_bench_runs_one_short_round(tmp_path: Path) -> None:
    out = tmp_path / "intercept.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.intercept_load", "--seconds", "1", "--warmup", "0", "--rounds", "1",
         "--connections", "4", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    assert done.returncode == 0, f"bench.intercept_load failed:\n{done.stdout}\n{done.stderr}"
    doc = json.loads(out.read_text())
    (round_one,) = doc["rounds"]
    assert set(round_one) == {"forward", "intercepted", "aiohttp"}
    for name, run in round_one.items():
        assert run["requests"] > 0 and run["errors"] == 0, (name, run)
    assert doc["intercepted_counted"] >= round_one["intercepted"]["requests"]
    assert set(doc["ratios"]) == {"intercepted_vs_forward", "intercepted_vs_aiohttp", "forward_cpu_vs_intercepted_cpu"}
