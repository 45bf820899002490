"""The benchmark harness (`make bench`) still works: a very short run of its real pieces.

Starts the real upstream nginx (TLS, trustme certs), the aiohttp proxy peer pinned to a CPU,
checks both proxy 100 B and 1 MiB byte-exact, streams a body through, drives wrk at c1 for
1 s, and reads back the JSON report. Keeps the harness from rotting between benchmark runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STREAM_MIB = 4


@pytest.mark.timeout(90)
def test_bench_harness_measures_aiohttp_peer_and_direct(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "direct,aiohttp", "--levels", "1", "--duration", "1",
         "--warmup", "0", "--stream-mib", str(STREAM_MIB), "--work-dir", str(tmp_path / "work"),
         "--results-dir", str(tmp_path / "results")],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert done.returncode == 0, f"bench.run failed:\n{done.stdout}\n{done.stderr}"
    doc = json.loads((tmp_path / "results" / "latest.json").read_text())
    by_name = {result["name"]: result for result in doc["candidates"]}
    assert set(by_name) == {"direct", "aiohttp"}

    peer = by_name["aiohttp"]
    assert peer["ok"], peer.get("error")
    assert peer["checks"] == {"/100b": True, "/1m": True}  # byte-exact through the peer
    assert peer["stream"]["status"] == 200
    assert peer["stream"]["bytes"] == STREAM_MIB * 1024 * 1024
    assert peer["stream"]["peak_rss_bytes"] >= peer["idle_rss_bytes"] > 0
    c1 = peer["load"]["1"]
    assert c1["requests"] > 0 and c1["rps"] > 0 and c1["errors"] == 0
    assert 0 < c1["p50_ms"] <= c1["p99_ms"]
    assert c1["cpu_us_per_req"] > 0
    assert 0 < peer["ready_ms"] < 15_000
    # One client connection at a time: the peer's pool reuses one or two upstream connections.
    assert 1 <= peer["upstream"]["connections"] <= 4
    assert peer["upstream"]["requests"] >= c1["requests"]
    assert "added_p50_ms" in peer

    direct = by_name["direct"]
    assert direct["ok"], direct.get("error")
    assert direct["load"]["1"]["requests"] > 0

    # The harness stopped what it started.
    assert not os.path.exists(f"/proc/{peer['pid']}")
    table = (tmp_path / "results" / "latest.md").read_text()
    assert "| aiohttp |" in table and "| direct |" in table
    assert table in done.stdout


@pytest.mark.timeout(120)
def test_bench_tunnel_section_measures_sidecar_tinyproxy_and_direct(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "tunnel", "--quick", "--stream-mib", str(STREAM_MIB),
         "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    assert done.returncode == 0, f"bench.run failed:\n{done.stdout}\n{done.stderr}"
    section = json.loads((tmp_path / "results" / "latest.json").read_text())["tunnel"]
    by_name = {result["name"]: result for result in section["candidates"]}
    assert set(by_name) == {"direct", "sidecar", "tinyproxy"}
    for result in by_name.values():
        assert result["ok"], result.get("error")
        assert result["stream_mib_s"] > 0 and result["ttfb_new_ms"] > 0 and result["ttfb_kept_ms"] > 0
        assert result["new_tunnels"]["ok"] == section["settings"]["tunnels"]
    assert by_name["sidecar"]["new_tunnels"]["cpu_us_per_tunnel"] > 0
    assert section["goals"][0][0].startswith("100 MiB through a tunnel")
    assert "### Tunnels (CONNECT" in done.stdout
