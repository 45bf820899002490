"""The tunnel section of `make bench`: HTTPS through CONNECT, ours beside tinyproxy and direct.

    python -m bench.tunnel              # alone: starts its own upstream nginx (100 MiB stream)
    python -m bench.tunnel --quick      # fewer tunnels and samples
    python -m bench.run                 # the whole benchmark runs this section last

The client is curl with `-x` (an https:// URL through a proxy is a CONNECT tunnel; direct:
no proxy); the upstream is the same nginx as the HTTP candidates', on `https://localhost`.
Per candidate, started alone and pinned to the proxy CPU like the others:

- stream: 100 MiB through one tunnel (best of a few downloads), MiB/s and the proxy's peak RSS;
- new tunnels/s: curl `--parallel` (8 at a time) fetching /100b, each transfer on a new tunnel
  with a full TLS handshake end to end (`Connection: close`, `--no-sessionid`), and the
  proxy's CPU per tunnel;
- c1 time to first byte (median of sequential transfers): on a new tunnel each time (CONNECT +
  handshake + request), and on one kept tunnel (the splice's own latency). "Added" is the
  candidate's minus direct's.

Issue 15's goals: MiB/s >= 0.9x tinyproxy's, new tunnels/s >= 0.8x, added c1 TTFB <= 1.2x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench import candidates, load, procs
from bench import upstream as upstream_module

MIB = 1024 * 1024
NAMES = ["direct", "sidecar", "tinyproxy"]
PEER = "tinyproxy"

TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 1024
LogFile "{log}"
LogLevel Connect
DisableViaHeader Yes
ConnectPort {upstream_port}
"""


def sidecar(ctx: candidates.Context) -> candidates.Candidate:
    """Ours with the benchmark's config, CONNECT allowed to the upstream's port."""
    listen, admin = procs.free_ports(2)
    path = candidates.sidecar_config(ctx, "sidecar-tunnel", listen, admin)
    config = yaml.safe_load(path.read_text())
    config["policy"]["connect_ports"] = [ctx.upstream.h1_port]
    # localhost may also resolve to ::1, which the policy denies: a name with any denied
    # address is refused as a whole. The static map pins it to the upstream's address.
    config["resolve"] = {"localhost": "127.0.0.1"}
    path.write_text("# generated for the tunnel section\n" + yaml.safe_dump(config, sort_keys=False))
    return candidates.Candidate(
        name="sidecar", description="egress-sidecar, CONNECT (SNI check, metrics, one access line per tunnel)",
        base_url=f"http://127.0.0.1:{listen}",
        argv=procs.pinned(ctx.proxy_cpu, [candidates._bin("egress-sidecar"), "run", "--config", str(path)]),
        readiness_url=f"http://127.0.0.1:{admin}/readyz", config_file=path, python=True,
    )


def tinyproxy(ctx: candidates.Context) -> candidates.Candidate:
    (port,) = procs.free_ports(1)
    work = ctx.work / "tinyproxy"
    work.mkdir(exist_ok=True)
    conf = work / "tinyproxy.conf"
    conf.write_text(TINYPROXY_CONF.format(port=port, log=work / "tinyproxy.log", upstream_port=ctx.upstream.h1_port))
    return candidates.Candidate(
        name="tinyproxy", description="tinyproxy (C, a thread per connection), CONNECT, a log line per connection",
        base_url=f"http://127.0.0.1:{port}",
        argv=procs.pinned(ctx.proxy_cpu, ["tinyproxy", "-d", "-c", str(conf)]), config_file=conf,
    )


def direct(ctx: candidates.Context) -> candidates.Candidate:
    return candidates.Candidate(name="direct", description="curl straight to the upstream (no proxy)", base_url="")


BUILDERS = {"direct": direct, "sidecar": sidecar, "tinyproxy": tinyproxy}


def _curl(candidate: candidates.Candidate, ca_file: Path) -> list[str]:
    argv = ["curl", "-sS", "--cacert", str(ca_file), "--noproxy", ""]
    return argv + (["-x", candidate.base_url] if candidate.base_url else [])


def _url(ctx: candidates.Context, path: str) -> str:
    return f"https://localhost:{ctx.upstream.h1_port}{path}"


def new_tunnels(candidate: candidates.Candidate, ctx: candidates.Context, count: int, parallel: int,
                cpu: int | None, pid: int | None) -> dict[str, Any]:
    """`count` transfers of /100b, `parallel` at a time, each on a new tunnel with a full handshake."""
    argv = [*_curl(candidate, ctx.upstream.certs.ca_file), "--parallel", "--parallel-max", str(parallel),
            "--no-sessionid", "-H", "Connection: close", "-o", "/dev/null", "-w", "%{http_code}\n",
            "--max-time", "30", _url(ctx, f"/100b?[1-{count}]")]
    cpu_before = procs.cpu_seconds(pid) if pid else 0.0
    started = time.monotonic()
    done = subprocess.run(procs.pinned(cpu, argv), capture_output=True, text=True, timeout=300, check=False)
    seconds = time.monotonic() - started
    codes = done.stdout.split()
    ok = codes.count("200")
    result: dict[str, Any] = {"transfers": count, "ok": ok, "seconds": seconds, "per_s": ok / seconds}
    if pid:
        result["cpu_us_per_tunnel"] = (procs.cpu_seconds(pid) - cpu_before) / max(ok, 1) * 1e6
    return result


def ttfb(candidate: candidates.Candidate, ctx: candidates.Context, count: int, cpu: int | None,
         new: bool) -> float:
    """Median time to first byte (ms) of `count` sequential /100b transfers (the first is dropped
    when the tunnel is kept: it pays for the set-up)."""
    argv = [*_curl(candidate, ctx.upstream.certs.ca_file), "-o", "/dev/null", "-w", "%{time_starttransfer}\n"]
    if new:
        argv += ["--no-sessionid", "-H", "Connection: close"]
    done = subprocess.run(procs.pinned(cpu, [*argv, _url(ctx, f"/100b?[1-{count}]")]), capture_output=True,
                          text=True, timeout=300, check=True)
    times = [float(x) * 1000 for x in done.stdout.split()]
    if not new:
        times = times[1:]
    return statistics.median(times)


def measure(candidate: candidates.Candidate, ctx: candidates.Context, settings: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"name": candidate.name, "description": candidate.description, "ok": False,
                              "command": " ".join(candidate.argv) if candidate.argv else None}
    started = None
    cpu = settings["load_cpu"]
    if candidate.argv:
        started = procs.spawn(f"tunnel-{candidate.name}", candidate.argv, ctx.work / f"tunnel-{candidate.name}.log",
                              cwd=candidates.ROOT)
    try:
        probe = [*_curl(candidate, ctx.upstream.certs.ca_file), "-o", "/dev/null", "-w", "%{http_code}",
                 "--max-time", "5", _url(ctx, "/100b")]
        procs.wait_for(lambda: (started is None or started.check_alive()) and subprocess.run(
            probe, capture_output=True, text=True, timeout=10, check=False).stdout == "200",
            15, f"{candidate.name} tunnel answer")
        pid = started.pid if started else None
        runs = [load.stream(_url(ctx, "/stream"), cpu, pid, ctx.upstream.certs.ca_file,
                            proxy=candidate.base_url or None) for _ in range(settings["stream_runs"])]
        for run in runs:
            if run.status != 200 or run.bytes != ctx.upstream.stream_bytes:
                raise RuntimeError(f"stream: {run.status} with {run.bytes} bytes")
        result["stream_mib_s"] = max(run.mib_per_s for run in runs)
        result["stream_peak_rss_mib"] = max(run.peak_rss_bytes for run in runs) / MIB if pid else None
        result["new_tunnels"] = new_tunnels(candidate, ctx, settings["tunnels"], settings["parallel"], cpu, pid)
        if result["new_tunnels"]["ok"] != settings["tunnels"]:
            raise RuntimeError(f"new tunnels: {result['new_tunnels']}")
        result["ttfb_new_ms"] = ttfb(candidate, ctx, settings["ttfb_samples"], cpu, new=True)
        result["ttfb_kept_ms"] = ttfb(candidate, ctx, settings["ttfb_samples"], cpu, new=False)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - recorded; the other candidates still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        if started:
            result["log_tail"] = started.log_tail()
    finally:
        if started:
            procs.stop(started)
    return result


def run_section(ctx: candidates.Context, load_cpu: int | None, quick: bool) -> dict[str, Any]:
    """Every tunnel candidate in turn; the dict `report` renders."""
    settings = {"load_cpu": load_cpu, "stream_runs": 2 if quick else 3, "tunnels": 300 if quick else 2000,
                "parallel": 8, "ttfb_samples": 50 if quick else 200}
    results = []
    for name in NAMES:
        print(f"bench: tunnel {name} ...", file=sys.stderr, flush=True)
        results.append(measure(BUILDERS[name](ctx), ctx, settings))
    section = {"settings": settings, "candidates": results}
    by_name = {r["name"]: r for r in results if r["ok"]}
    base = by_name.get("direct")
    for result in by_name.values():
        if base is not None and result is not base:
            result["added_ttfb_new_ms"] = result["ttfb_new_ms"] - base["ttfb_new_ms"]
            result["added_ttfb_kept_ms"] = result["ttfb_kept_ms"] - base["ttfb_kept_ms"]
    section["goals"] = goals(by_name)
    return section


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs not in (None, 0) else None


def goals(by_name: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, bool | None, str]]:
    ours, peer = by_name.get("sidecar"), by_name.get(PEER)
    if ours is None or peer is None:
        return [("tunnel goals", None, "sidecar or tinyproxy did not finish")]
    checks = [
        ("100 MiB through a tunnel >= 0.9x tinyproxy MiB/s",
         _ratio(ours["stream_mib_s"], peer["stream_mib_s"]), lambda r: r >= 0.9),
        ("new tunnels/s (TLS end to end) >= 0.8x tinyproxy",
         _ratio(ours["new_tunnels"]["per_s"], peer["new_tunnels"]["per_s"]), lambda r: r >= 0.8),
        ("c1 TTFB added, new tunnel <= 1.2x tinyproxy's",
         _ratio(ours.get("added_ttfb_new_ms"), peer.get("added_ttfb_new_ms")), lambda r: r <= 1.2),
        ("c1 TTFB added, kept tunnel <= 1.2x tinyproxy's",
         _ratio(ours.get("added_ttfb_kept_ms"), peer.get("added_ttfb_kept_ms")), lambda r: r <= 1.2),
    ]
    return [(goal, None if r is None else bool(ok(r)), "–" if r is None else f"{r:.2f}x") for goal, r, ok in checks]


def _n(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def markdown(section: Mapping[str, Any]) -> str:
    s = section["settings"]
    lines = [
        "### Tunnels (CONNECT, HTTPS end to end)", "",
        (f"curl through each proxy to the upstream nginx over `https://localhost`; stream: best of "
         f"{s['stream_runs']}; new tunnels: {s['tunnels']} transfers, {s['parallel']} at a time, each a new "
         f"tunnel and a full TLS handshake; TTFB: median of {s['ttfb_samples']} sequential transfers. "
         "Added: minus direct's."), "",
        ("| candidate | stream MiB/s | stream peak RSS MiB | new tunnels/s | CPU µs/tunnel | TTFB new ms | "
         "TTFB kept ms | added new ms | added kept ms |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in section["candidates"]:
        if not r["ok"]:
            lines.append(f"| {r['name']} | failed: {r.get('error', '?')} |" + " |" * 7)
            continue
        nt = r["new_tunnels"]
        lines.append("| " + " | ".join([
            r["name"], _n(r["stream_mib_s"]), _n(r["stream_peak_rss_mib"], 1), _n(nt["per_s"]),
            _n(nt.get("cpu_us_per_tunnel")), _n(r["ttfb_new_ms"], 2), _n(r["ttfb_kept_ms"], 3),
            _n(r.get("added_ttfb_new_ms"), 2), _n(r.get("added_ttfb_kept_ms"), 3)]) + " |")
    lines += ["", "| goal (issue 15) | met | ours ÷ tinyproxy |", "| --- | --- | --- |"]
    for goal, met, shown in section["goals"]:
        lines.append(f"| {goal} | {'–' if met is None else 'yes' if met else 'NO'} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tunnel", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stream-mib", type=int, default=100)
    parser.add_argument("--work-dir", type=Path, default=candidates.ROOT / "bench" / ".work" / "tunnel")
    args = parser.parse_args(argv)
    if not shutil.which("tinyproxy"):
        print("bench: tinyproxy is missing; run scripts/install-system-deps.sh", file=sys.stderr)
        return 2
    allowed = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = (allowed[0], allowed[-1]) if len(allowed) > 1 else (None, None)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    up = upstream_module.start(args.work_dir / "upstream", load_cpu, args.stream_mib * MIB)
    try:
        section = run_section(candidates.Context(work=args.work_dir, upstream=up, proxy_cpu=proxy_cpu),
                              load_cpu, args.quick)
    finally:
        procs.stop(up.started)
        (args.work_dir / "upstream" / "www" / "stream").unlink(missing_ok=True)
    print(markdown(section))
    return 0 if all(r["ok"] for r in section["candidates"]) else 1


if __name__ == "__main__":
    sys.exit(main())
