"""Shared checks for the fault suite: an error's full shape, a healthy pool, the sidecar's sockets."""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import Sidecar
from tests.servers.upstream import random_bytes

# A pool small enough that one leaked slot shows: 4 connections, and a pool wait of 0.5 s.
SMALL_POOL: dict[str, Any] = {
    "pool": {"max_connections": 4, "max_keepalive_connections": 4},
    "timeouts": {"pool": "500ms", "connect": "1s"},
}
# One "hold" keeps a connection busy for ~0.7 s (7 chunks, 0.1 s apart): longer than the pool wait.
HOLD_CHUNKS, HOLD_INTERVAL = 7, 0.1


def assert_sidecar_error(sidecar: Sidecar, response: httpx.Response, status: int, kind: str) -> None:
    """The response is the sidecar's own error: status, header, one-line body, and a log line."""
    assert response.status_code == status, response.text
    assert response.headers["x-egress-error"] == kind
    body = response.content
    assert body.startswith(f"egress-sidecar: {kind}: ".encode()) and body.count(b"\n") == 1 and body.endswith(b"\n")
    sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == kind)


def hold(url: str) -> bytes:
    with httpx.Client(timeout=10) as client:
        response = client.get(url)
        assert response.status_code == 200, (response.status_code, response.text)
        return response.content


def assert_pool_healthy(sidecar: Sidecar, prefix: str = "/up", slots: int = 4) -> None:
    """A follow-up request succeeds quickly, and `slots` concurrent holds all get a connection.

    Each hold keeps its connection ~0.7 s, longer than the 0.5 s pool wait of SMALL_POOL: had
    one slot leaked, one of the holds would wait for it and get 503 pool_timeout.
    """
    started = time.monotonic()
    response = httpx.get(f"{sidecar.url}{prefix}/echo", timeout=5)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 1.0
    url = f"{sidecar.url}{prefix}/slow?n={HOLD_CHUNKS}&interval={HOLD_INTERVAL}"
    expected = b"".join(random_bytes(1024, i) for i in range(HOLD_CHUNKS))
    with ThreadPoolExecutor(slots) as pool:
        bodies = list(pool.map(lambda _: hold(url), range(slots)))
    assert bodies == [expected] * slots


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def established_to(port: int, pid: int | None = None) -> int:
    """Established TCP connections to 127.0.0.1:`port` (from `pid`'s side when given), per `ss`."""
    args = ["ss", "-tnH", "state", "established", "dst", f"127.0.0.1:{port}"]
    if pid is not None:
        args[1] = "-tnpH"
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    if pid is not None:
        lines = [line for line in lines if f"pid={pid}," in line]
    return len(lines)


def established_on(port: int) -> int:
    """Established TCP connections whose local end is 127.0.0.1:`port` (a listener's accepted ones)."""
    out = subprocess.run(["ss", "-tnH", "state", "established", "src", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def run_load(sidecar: Sidecar, *, total: int, concurrency: int, seconds: float, mix: str = "ok",
             prefix: str = "/up") -> dict[str, Any]:
    """Run tests.load_client in its own process (so it does not share this process's GIL with the upstream)."""
    import json
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "tests.load_client", "--base", sidecar.url, "--prefix", prefix, "--total", str(total),
         "--concurrency", str(concurrency), "--seconds", str(seconds), "--mix", mix],
        capture_output=True, text=True, timeout=seconds + 60, cwd=ROOT, check=True,
    )
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary
