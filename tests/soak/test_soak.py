"""A bounded soak: minutes of mixed traffic; the sidecar's memory, descriptors and pool stay flat.

Run with `make soak` (not part of `make test`). SOAK_SECONDS shortens it for a trial run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Sidecar
from tests.e2e.fault_support import established_to, fd_count
from tests.servers.upstream import Upstream

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "300"))
WARM_UP = min(60.0, SOAK_SECONDS / 5)  # imports, pool fill, allocator arenas: not counted
SAMPLE_EVERY = 5.0
CONCURRENCY = 32
POOL = 16
# Mixed traffic: 6 of 10 plain GETs, 2 uploads (16 KiB), 1 upstream reset (502), 1 client abort.
MIX = "ok=6,post=2,error=1,abort=1"

# Bounds after warm-up. RSS: the allocator's arenas breathe by a few MiB under this load; a
# leak of a few hundred bytes per request (tens of thousands of requests) would pass 8 MiB.
RSS_SPREAD_KIB = 16 * 1024
RSS_TREND_KIB = 8 * 1024
# Descriptors: the 32 client connections churn (aborts reconnect) and pooled connections are
# replaced after resets/aborts, so the count moves within clients + pool; a leak is a trend.
FD_SPREAD = CONCURRENCY + POOL
FD_TREND = 8


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 240)
def test_mixed_traffic_for_minutes_keeps_rss_fds_and_pool_flat(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": fresh_upstream.base, "timeouts": {"read": "5s"}}],
        pool={"max_connections": POOL, "max_keepalive_connections": POOL},
        timeouts={"pool": "10s"},
    )
    pid = sidecar.proc.pid
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.load_client", "--base", sidecar.url, "--total", "100000000",
         "--concurrency", str(CONCURRENCY), "--seconds", str(SOAK_SECONDS), "--mix", MIX],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    samples: list[tuple[float, int, int, int]] = []  # (t, rss KiB, fds, pooled connections)
    started = time.monotonic()
    try:
        next_sample = started
        while load.poll() is None and time.monotonic() - started < SOAK_SECONDS + 120:
            if time.monotonic() >= next_sample:
                samples.append((round(time.monotonic() - started, 1), sidecar.rss_kib(), fd_count(pid),
                                established_to(fresh_upstream.port, pid)))
                next_sample += SAMPLE_EVERY
            try:
                load.wait(timeout=max(0.0, next_sample - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        out, _ = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(10)
    summary = json.loads(out)
    steady = [s for s in samples if s[0] >= WARM_UP]
    rss, fds, pooled = ([s[i] for s in steady] for i in (1, 2, 3))
    third = max(1, len(steady) // 3)
    report = {
        "requests": summary["sent"], "seconds": summary["seconds"], "outcomes": summary["outcomes"],
        "latency": summary["latency"], "samples": len(samples), "steady_samples": len(steady),
        "rss_kib": {"min": min(rss), "max": max(rss),
                    "trend": round(statistics.mean(rss[-third:]) - statistics.mean(rss[:third]))},
        "fds": {"min": min(fds), "max": max(fds),
                "trend": round(statistics.mean(fds[-third:]) - statistics.mean(fds[:third]), 1)},
        "pooled": {"min": min(pooled), "max": max(pooled)},
        "rss_start_kib": samples[0][1],
    }
    print("\nSOAK", json.dumps(report))
    assert len(steady) >= 5, report
    unexpected = {k: v for k, v in summary["outcomes"].items() if not k.endswith("_ok")}
    assert unexpected == {}, summary
    assert max(rss) - min(rss) <= RSS_SPREAD_KIB and report["rss_kib"]["trend"] <= RSS_TREND_KIB, report
    assert max(fds) - min(fds) <= FD_SPREAD and report["fds"]["trend"] <= FD_TREND, report
    assert max(pooled) <= POOL, report
    assert sidecar.terminate() == 0
