"""Start-up cost of `egress-sidecar run`: time to ready, time to a first answer, idle RSS.

    python -m bench.startup                    # 10 starts with the embedded default config
    python -m bench.startup --runs 5 --config FILE
    python -m bench.startup --proxied          # the benchmark's config and upstream (nginx, TLS)

Each run spawns `egress-sidecar run` on free ports (EGRESS_LISTEN_PORT / EGRESS_ADMIN_PORT,
admin on 127.0.0.1) and records, from the spawn:
- ready: the first `/readyz` 200, and the CPU time (user + system) the process had used by
  then: steadier than wall time on a busy machine (at 10 ms clock ticks);
- answer: the first answer of the data listener to a request (one whose Host is the sidecar's
  admin listener, answered 508 `loop`: it runs the forward path, the error path, the access
  log and the metrics, and sends nothing anywhere); with `--proxied`, the first byte-exact
  100 B answer proxied from the benchmark's upstream nginx over TLS (bench/upstream.py) with
  the benchmark's config (bench/sidecar.yaml: an HTTP/1.1 and an HTTP/2 route), as
  `make bench` measures "ready";
- RSS (VmRSS from /proc) at ready, then after that answer and one `/metrics` scrape: the
  figure that counts, since Prometheus scrapes within seconds of start and anything a first
  request or scrape imports stays loaded.
Issue 3's goals: ready <= 0.5 s, idle RSS <= 45 MiB. The machine is shared: read medians.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import candidates, procs
from bench import upstream as upstream_module
from bench.bodies import SMALL_BODY

MAX_RUNS = 50


@dataclass
class Start:
    ready_ms: float
    ready_cpu_ms: float
    answer_ms: float
    rss_ready: int
    rss_idle: int


def _get(port: int, path: str, host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


Probe = Callable[[int, int], None]  # (listen port, admin port): one request, raises unless answered right


def loop_probe(listen: int, admin: int) -> None:
    # Host names the admin listener: a loop, refused before any connection is made.
    status, _ = _get(listen, "/startup-probe", host=f"127.0.0.1:{admin}")
    if status != 508:
        raise RuntimeError(f"a request to the sidecar itself was answered {status}, not 508 (loop)")


def proxied_probe(listen: int, admin: int) -> None:
    status, body = _get(listen, "/up/100b")
    if status != 200 or body != SMALL_BODY:
        raise RuntimeError(f"/up/100b answered {status} with {len(body)} bytes, not the upstream's 100 B")


def one_start(argv: list[str], work: Path, index: int, timeout: float, probe: Probe = loop_probe) -> Start:
    """Spawn one sidecar, wait (deadline: `timeout`) for ready and a first answer, measure, stop it."""
    listen, admin = procs.free_ports(2)
    env = {**os.environ, "EGRESS_LISTEN_PORT": str(listen), "EGRESS_ADMIN_PORT": str(admin),
           "EGRESS_ADMIN_HOST": "127.0.0.1"}
    started = procs.spawn("sidecar", argv, work / f"sidecar-{index}.log", env=env)
    try:
        procs.wait_for(lambda: started.check_alive() and _get(admin, "/readyz")[0] == 200, timeout, "/readyz 200")
        ready_ms = (time.monotonic() - started.spawned_at) * 1e3
        ready_cpu_ms = procs.cpu_seconds(started.pid) * 1e3
        rss_ready = procs.rss_bytes(started.pid)
        probe(listen, admin)
        answer_ms = (time.monotonic() - started.spawned_at) * 1e3
        status, body = _get(admin, "/metrics")
        if status != 200 or b"egress_requests_total" not in body:
            raise RuntimeError(f"/metrics answered {status} without egress_requests_total")
        rss_idle = procs.rss_bytes(started.pid)
        return Start(ready_ms, ready_cpu_ms, answer_ms, rss_ready, rss_idle)
    except Exception:
        print(started.log_tail(), file=sys.stderr)
        raise
    finally:
        procs.stop(started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help=f"starts to measure (at most {MAX_RUNS})")
    parser.add_argument("--config", help="a config file to pass to `run` (default: the embedded defaults)")
    parser.add_argument("--proxied", action="store_true",
                        help="the benchmark's upstream nginx and config; the answer is a proxied 100 B")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline for each start, in seconds")
    args = parser.parse_args()
    if args.proxied and args.config:
        parser.error("--proxied brings its own config (bench/sidecar.yaml)")
    runs = max(1, min(args.runs, MAX_RUNS))
    argv = [str(Path(sys.executable).parent / "egress-sidecar"), "run"]
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    upstream = None
    try:
        probe = loop_probe
        if args.proxied:
            upstream = upstream_module.start(work / "upstream", None, stream_bytes=1024)
            context = candidates.Context(work=work, upstream=upstream, proxy_cpu=None)
            argv += ["--config", str(candidates.sidecar_config(context, "sidecar", 0, 0))]
            probe = proxied_probe
        elif args.config:
            argv += ["--config", args.config]
        starts = [one_start(argv, work, index, args.timeout, probe) for index in range(runs)]
    finally:
        if upstream is not None:
            procs.stop(upstream.started)
        shutil.rmtree(work, ignore_errors=True)
    mib = 1024 * 1024

    def row(name: str, values: list[float], unit: str) -> str:
        return (f"{name:<22} median {statistics.median(values):7.1f} {unit}   "
                f"min {min(values):7.1f}   max {max(values):7.1f}")

    print(f"`{' '.join(argv[1:])}`, {runs} starts")
    print(row("ready (/readyz 200)", [s.ready_ms for s in starts], "ms"))
    print(row("CPU used to ready", [s.ready_cpu_ms for s in starts], "ms"))
    print(row("first answer", [s.answer_ms for s in starts], "ms"))
    print(row("RSS at ready", [s.rss_ready / mib for s in starts], "MiB"))
    print(row("RSS idle (after 1st)", [s.rss_idle / mib for s in starts], "MiB"))


if __name__ == "__main__":
    main()
