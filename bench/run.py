"""`make bench`: start the upstream, then each candidate in turn, measure it, print and save the report.

    python -m bench.run                 # full: c1, c32, c256 x 5 s (+1 s warm-up each), 100 MiB stream
    python -m bench.run --quick         # smoke: 2 s per level, 1 s warm-up
    python -m bench.run --only direct,aiohttp --levels 1 --duration 1 --warmup 0
    python -m bench.run --only tunnel    # only the CONNECT section (bench/tunnel.py)

Each candidate is started, checked byte-exact (100 B and 1 MiB through it), streamed, loaded,
and stopped before the next one starts, so they never compete with each other for the CPU.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from bench import candidates, load, procs, profile, report, tunnel
from bench import upstream as upstream_module
from bench.bodies import SMALL_BODY

MIB = 1024 * 1024
_EXCEPTION_LINE = re.compile(rb"^[\w.]*(Error|Exception|Exit|Interrupt)\w*: ")


def fetch(url: str, ca_file: Path | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """One GET on a fresh connection (status, body)."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def scrape(url: str) -> dict[str, Any]:
    """One scrape of a Prometheus endpoint: its status, size, and whether the request counter is there
    (the report shows it, so a run with metrics silently off cannot pass for an honest one)."""
    try:
        status, body = fetch(url, timeout=5)
    except OSError as exc:
        return {"status": None, "error": str(exc)}
    return {"status": status, "bytes": len(body), "has_requests_total": b"egress_requests_total" in body}


def count_lines(path: Path) -> int:
    with open(path, "rb") as log:
        return sum(1 for _ in log)


def summarize_log(path: Path) -> dict[str, Any]:
    """Lines in a candidate's stdout+stderr, and for JSON-lines logs a count per event (and error
    kind) of the warnings and errors: what went wrong out of wrk's sight (e.g. after it stopped)."""
    lines, problems = 0, collections.Counter[str]()
    with open(path, "rb") as log:
        for raw in log:
            lines += 1
            if not raw.startswith(b"{"):
                # A plain-text traceback ends with `module.SomeError: message`: count that line.
                if _EXCEPTION_LINE.match(raw):
                    problems[raw.decode(errors="replace").strip()[:100]] += 1
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("level") in ("warning", "error", "critical"):
                label = str(entry.get("event", "")).strip()[:60]
                if entry.get("kind"):
                    label += f"/{entry['kind']}"
                if entry.get("detail"):
                    label += f" ({str(entry['detail'])[:60]})"
                problems[label] += 1
    return {"path": str(path), "lines": lines, "problems": dict(problems.most_common(10))}


def _ok_small(candidate: candidates.Candidate) -> bool:
    status, body = fetch(candidate.base_url + "/100b", candidate.ca_file, timeout=2)
    return status == 200 and body == SMALL_BODY


def _ok_status(url: str) -> bool:
    return fetch(url, timeout=2)[0] == 200


def wait_ready(candidate: candidates.Candidate, started: procs.Started | None, timeout: float,
               result: dict[str, Any]) -> None:
    """Poll (deadline: `timeout`) until the candidate proxies a byte-exact 100 B answer; record the times."""
    if started is None:
        procs.wait_for(lambda: _ok_small(candidate), timeout, f"{candidate.name} 100 B answer")
        return
    if candidate.readiness_url:
        url = candidate.readiness_url
        procs.wait_for(lambda: started.check_alive() and _ok_status(url), timeout, f"{candidate.name} {url}")
        result["readyz_ms"] = (time.monotonic() - started.spawned_at) * 1e3
    procs.wait_for(lambda: started.check_alive() and _ok_small(candidate), timeout,
                   f"{candidate.name} first proxied 100 B answer")
    result["ready_ms"] = (time.monotonic() - started.spawned_at) * 1e3
    result["idle_rss_bytes"] = procs.rss_bytes(started.pid)


def check_bytes(candidate: candidates.Candidate, up: upstream_module.Upstream) -> dict[str, bool]:
    """Byte-exact through the candidate (sha256 of /100b and /1m): a proxy that mangles bodies gets no numbers."""
    checks = {}
    for path in ["/100b", "/1m"] if candidate.proxies else ["/100b"]:
        status, body = fetch(candidate.base_url + path, candidate.ca_file)
        checks[path] = status == 200 and hashlib.sha256(body).hexdigest() == up.digests[path]
    if not all(checks.values()):
        raise RuntimeError(f"byte-exact check failed: {checks}")
    return checks


def load_level(candidate: candidates.Candidate, started: procs.Started | None, up: upstream_module.Upstream,
               level: int, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then one recorded wrk run at `level` connections, with the CPU both sides spent on it."""
    url = candidate.base_url + "/100b"
    warm = load.wrk(url, level, args.warmup, args.load_cpu) if args.warmup else None
    cpu_before = procs.cpu_seconds(started.pid) if started else 0.0
    upstream_cpu_before = procs.cpu_seconds(up.started.pid)
    run = load.wrk(url, level, args.duration, args.load_cpu)
    entry = run.to_json()
    requests = max(run.requests, 1)
    if started:
        entry["cpu_us_per_req"] = (procs.cpu_seconds(started.pid) - cpu_before) / requests * 1e6
        started.check_alive()
    entry["upstream_cpu_us_per_req"] = (procs.cpu_seconds(up.started.pid) - upstream_cpu_before) / requests * 1e6
    if warm is not None:  # not in the numbers, but failures while warming up are still failures
        entry["warmup"] = {"requests": warm.requests, "rps": warm.rps, "errors": warm.errors}
    return entry


def measure(candidate: candidates.Candidate, ctx: candidates.Context, args: argparse.Namespace) -> dict[str, Any]:
    """Start one candidate, measure everything the report shows, stop it. A failure is recorded, not raised."""
    up = ctx.upstream
    result: dict[str, Any] = {"name": candidate.name, "description": candidate.description, "ok": False,
                              "command": " ".join(candidate.argv) if candidate.argv else None,
                              "base_url": candidate.base_url}
    phases: dict[str, tuple[int, int]] = {"before": up.counters()}
    started = None
    if candidate.argv:
        started = procs.spawn(candidate.name, candidate.argv, ctx.work / f"{candidate.name}.log",
                              cwd=candidates.ROOT)
        result["pid"] = started.pid
    try:
        wait_ready(candidate, started, args.ready_timeout, result)
        result["checks"] = check_bytes(candidate, up)
        phases["checks"] = up.counters()
        if candidate.proxies and args.stream:
            streamed = load.stream(candidate.base_url + "/stream", args.load_cpu,
                                   started.pid if started else None, candidate.ca_file)
            if streamed.status != 200 or streamed.bytes != up.stream_bytes:
                raise RuntimeError(f"stream returned {streamed.status} with {streamed.bytes} bytes, "
                                   f"expected 200 with {up.stream_bytes}")
            result["stream"] = streamed.to_json()
            phases["stream"] = up.counters()
        result["load"] = {}
        for level in args.levels:
            result["load"][str(level)] = load_level(candidate, started, up, level, args)
            phases[f"c{level}"] = up.counters()
        if started and candidate.python and args.profile:
            result["profiles"] = profile_under_load(candidate, started, args)
        if started:
            result["hwm_bytes"] = procs.hwm_bytes(started.pid)
        if candidate.metrics_url:
            result["metrics"] = scrape(candidate.metrics_url)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - one candidate failing must not stop the others
        result["error"] = f"{type(exc).__name__}: {exc}".strip()
        if started:
            result["log_tail"] = started.log_tail()
    finally:
        if started:
            procs.stop(started)
            result["log"] = summarize_log(started.log_path)
        if candidate.access_log and candidate.access_log.exists():
            result["access_log_lines"] = count_lines(candidate.access_log)
        phases["after"] = up.counters()
        first = phases["before"]
        result["upstream"] = {
            "connections": phases["after"][0] - first[0],
            "requests": phases["after"][1] - first[1],
            "by_phase": {name: {"connections": value[0] - first[0], "requests": value[1] - first[1]}
                         for name, value in phases.items() if name != "before"},
        }
    return result


def profile_under_load(candidate: candidates.Candidate, started: procs.Started,
                       args: argparse.Namespace) -> dict[str, Any]:
    """An extra wrk run per --profile level while py-spy samples the candidate (not in the numbers)."""
    profiles = {}
    for level in args.profile:
        raw = args.results_dir / f"profile-{candidate.name}-c{level}.txt"
        sampler = profile.start(started.pid, args.duration, raw, args.load_cpu)
        run = load.wrk(candidate.base_url + "/100b", level, args.duration, args.load_cpu)
        profile.finish(sampler, timeout=args.duration + 30)
        profiles[str(level)] = {"rps_while_sampled": run.rps, **profile.summarize(raw)}
    return profiles


def machine_info() -> dict[str, Any]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))

    def version(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (done.stderr or done.stdout).strip().splitlines()[0]

    packages: dict[str, str | None] = {}
    for name in ("uvicorn", "uvloop", "httptools", "httpx", "httpcore", "aiohttp", "egress-sidecar"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cpu_model": cpu_model, "cpus": os.cpu_count(), "mem_gib": mem_kib / 1024 / 1024,
        "kernel": platform.release(), "python": platform.python_version(),
        "nginx": version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": " ".join(version(["wrk", "-v"]).split()[:2]),
        "packages": packages,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (2 s per level, 1 s warm-up)")
    parser.add_argument("--only", help=f"comma-separated candidates, from: {','.join(candidates.ORDER)}, "
                        "and `tunnel` (the CONNECT section, with tinyproxy; run last)")
    parser.add_argument("--levels", help="comma-separated wrk connection counts (default 1,32,256)")
    parser.add_argument("--duration", type=int, help="seconds per level (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up seconds per level (default 1; 0: none)")
    parser.add_argument("--stream-mib", type=int, default=100, help="size of the streamed body")
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    allowed = sorted(os.sched_getaffinity(0))  # a cpuset may hide CPU 0/1: pin to what we may use
    parser.add_argument("--proxy-cpu", type=int, default=allowed[0])
    parser.add_argument("--load-cpu", type=int, default=allowed[-1])
    parser.add_argument("--profile", help="comma-separated levels: py-spy the Python candidates under "
                        "an extra wrk run at each (e.g. 32); top frames go in the report")
    parser.add_argument("--ready-timeout", type=float, default=15.0)
    parser.add_argument("--work-dir", type=Path, default=candidates.ROOT / "bench" / ".work")
    parser.add_argument("--results-dir", type=Path, default=candidates.ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",")] if args.levels else [1, 32, 256]
    args.duration = args.duration or (2 if args.quick else 5)
    args.warmup = 1 if args.warmup is None else args.warmup
    only = args.only.split(",") if args.only else [*candidates.ORDER, "tunnel"]
    args.tunnel = "tunnel" in only
    args.only = [name for name in only if name != "tunnel"]
    args.profile = [int(x) for x in args.profile.split(",")] if args.profile else []
    if args.profile and not profile.available():
        parser.error("--profile needs py-spy (pip install -e '.[bench]')")
    unknown = set(args.only) - set(candidates.BUILDERS)
    if unknown:
        parser.error(f"unknown candidates: {', '.join(sorted(unknown))}")
    if args.proxy_cpu == args.load_cpu:
        args.proxy_cpu = args.load_cpu = None  # one CPU: nothing to pin apart (the report says None)
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks that stop what we started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    for tool in ("nginx", "wrk", "curl", "taskset"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: `{tool}` is missing; run scripts/install-system-deps.sh (make bench does)",
                  file=sys.stderr)
            return 2
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})  # the harness itself stays off the proxy's CPU
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "settings": {"levels": args.levels, "duration_s": args.duration, "warmup_s": args.warmup,
                     "stream_bytes": args.stream_mib * MIB, "proxy_cpu": args.proxy_cpu,
                     "load_cpu": args.load_cpu, "pool_size": 100},
        "candidates": [],
    }
    began = time.monotonic()
    up = upstream_module.start(args.work_dir / "upstream", args.load_cpu, args.stream_mib * MIB)
    try:
        ctx = candidates.Context(work=args.work_dir, upstream=up, proxy_cpu=args.proxy_cpu)
        for name in [name for name in candidates.ORDER if name in args.only]:
            candidate = candidates.BUILDERS[name](ctx)  # built just before it runs: fresh ports
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            result = measure(candidate, ctx, args)
            if not result["ok"]:
                print(f"bench: {name} FAILED: {result['error']}\n{result.get('log_tail', '')}",
                      file=sys.stderr, flush=True)
            doc["candidates"].append(result)
        if args.tunnel:
            doc["tunnel"] = tunnel.run_section(ctx, args.load_cpu, args.quick)
    finally:
        procs.stop(up.started)
        (args.work_dir / "upstream" / "www" / "stream").unlink(missing_ok=True)
    direct = next((r for r in doc["candidates"] if r["name"] == "direct" and r["ok"]), None)
    if direct and 1 in args.levels:
        for result in doc["candidates"]:
            p50 = report._stat(result, 1, "p50_ms")
            if p50 is not None and result["name"] != "direct":
                result["added_p50_ms"] = p50 - direct["load"]["1"]["p50_ms"]
    doc["ratios"] = report.ratios(doc["candidates"], args.levels)
    doc["goals"] = report.goals(doc["candidates"], doc["settings"]["pool_size"])
    doc["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    doc["elapsed_s"] = time.monotonic() - began
    doc["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = report.markdown(doc)
    if "tunnel" in doc:
        text += "\n" + tunnel.markdown(doc["tunnel"])
    (args.results_dir / "latest.md").write_text(text)
    (args.results_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    print(f"bench: {doc['elapsed_s']:.0f} s; wrote {args.results_dir}/latest.md and latest.json",
          file=sys.stderr)
    tunnels_ok = all(result["ok"] for result in doc.get("tunnel", {}).get("candidates", []))
    return 0 if tunnels_ok and all(result["ok"] for result in doc["candidates"]) else 1


if __name__ == "__main__":
    sys.exit(main())
