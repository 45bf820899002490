"""The load side: wrk for request rate and latency, curl for one streamed download.

Both run pinned to the load CPU, each bounded by its own duration and a subprocess timeout.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # -> milliseconds


@dataclass(frozen=True)
class WrkResult:
    connections: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: dict[str, int]
    non_2xx: int

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str, connections: int) -> WrkResult:
    """Parse `wrk --latency` output (wrk 4.x)."""
    def grab(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    percentiles = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.MULTILINE)}
    if len(percentiles) != 4:
        raise ValueError(f"wrk output lacks the latency distribution:\n{output}")
    done = grab(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(g) for g in errors.groups()) if errors else (0, 0, 0, 0), strict=True))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency_max = grab(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)")
    return WrkResult(
        connections=connections,
        duration_s=_ms(done.group(2) + done.group(3)) / 1e3,
        requests=int(done.group(1)),
        rps=float(grab(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=percentiles["50"], p75_ms=percentiles["75"], p90_ms=percentiles["90"], p99_ms=percentiles["99"],
        max_ms=_ms(latency_max.group(1)),
        socket_errors=socket_errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk(url: str, connections: int, duration_s: int, cpu: int | None) -> WrkResult:
    """One wrk run: one thread (the load has one CPU), `connections` keep-alive connections."""
    argv = procs.pinned(cpu, ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
                              "--timeout", "5s", url])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout, connections)


@dataclass(frozen=True)
class StreamResult:
    status: int
    bytes: int
    mib_per_s: float
    seconds: float
    peak_rss_bytes: int  # highest VmRSS sum over the proxy's tree seen while the body streamed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def stream(url: str, cpu: int | None, watch_pid: int | None, ca_file: Path | None = None,
           timeout_s: float = 120, proxy: str | None = None) -> StreamResult:
    """Download `url` with curl into /dev/null; meanwhile poll the proxy's RSS every 5 ms.
    `proxy`: curl's `-x` (an https:// URL then goes through a CONNECT tunnel)."""
    tree: Sequence[int] = procs.descendants(watch_pid) if watch_pid else ()
    peak = [procs.rss_of(tree)]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], procs.rss_of(tree))
            stop.wait(0.005)

    watcher = threading.Thread(target=poll, daemon=True)
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout_s)),
            "-w", "%{http_code} %{size_download} %{speed_download}"]
    if ca_file:
        argv += ["--cacert", str(ca_file)]
    if proxy:
        argv += ["--noproxy", "", "-x", proxy]
    watcher.start()
    started = time.monotonic()
    try:
        done = subprocess.run(procs.pinned(cpu, [*argv, url]), capture_output=True, text=True,
                              timeout=timeout_s + 10, check=False)
    finally:
        stop.set()
        watcher.join()
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.strip()}")
    status, size, speed = done.stdout.split()
    return StreamResult(int(status), int(size), float(speed) / (1024 * 1024), seconds, peak[0])
