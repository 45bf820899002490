"""TLS interception under load: intercepted https:// next to the forward-proxy http:// path, one run.

Issue 19's goal: intercepted `https://` requests at c32 reach >= 0.75x the forward-proxy
`http://` path's req/s in the same run (keep-alive app connections), and >= 1.0x the aiohttp
proxy peer's figure. Everything as in bench/run.py: upstream nginx (TLS, `/100b`) and the load
on CPU 1, the proxy under test alone on CPU 0, each run bounded in time.

Measured, one after the other, against one sidecar process (bench/sidecar.yaml plus
`intercept.hosts: [localhost]`, the test CA for forward-proxy destinations):
- `forward`: wrk sending absolute-form `GET http://localhost:<up>/100b` to the sidecar, which
  originates TLS to the upstream (the forward-proxy form an app with HTTP_PROXY uses);
- `route`: wrk `http://127.0.0.1:<sidecar>/up/100b` (bench/run.py's figure, for reference);
- `intercepted`: wrk `https://localhost:<fwd>/100b` through bench/connect_forward.c, which opens
  one `CONNECT localhost:<up>` tunnel per wrk connection: the sidecar terminates the app's TLS
  with its minted leaf and sends the request through its pool, as for an app with HTTPS_PROXY.
and the aiohttp peer (bench/peers/aiohttp_proxy.py, also on CPU 0, idle but for its own runs):
wrk `/up/100b`. The three are measured back to back in each of `--rounds` rounds, so a machine
busy with other work weighs on all of them alike; the report gives each round's ratios and the
median round's, and the CPU per request of each path (the steadier figure on a shared machine).
Before any number, the intercepted path must return `/1m` byte-exact (curl with HTTPS_PROXY and
CURL_CA_BUNDLE pointing at the sidecar's bundle, as an injected app container has).

    .venv/bin/python -m bench.intercept_load [--seconds 5] [--warmup 1] [--connections 32] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import candidates, load, procs, profile
from bench import upstream as upstream_module

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / "bench" / ".work" / "intercept"
PROXY_CPU, LOAD_CPU = 0, 1


def wrk(url: str, connections: int, seconds: int, script: Path | None = None) -> load.WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if script is not None:
        argv += ["-s", str(script)]
    done = subprocess.run(procs.pinned(LOAD_CPU, [*argv, url]), capture_output=True, text=True,
                          timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    return load.parse_wrk(done.stdout, connections)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
    return usage.ru_utime + usage.ru_stime


def measured(name: str, url: str, pid: int, args: argparse.Namespace, load_pids: list[int],
             script: Path | None = None) -> dict[str, Any]:
    """One recorded wrk run after a warm-up, with the CPU per request of the proxy (CPU 0) and of
    everything on the load CPU (wrk, the upstream nginx, the CONNECT forwarder when it is used)."""
    if args.warmup:
        wrk(url, args.connections, args.warmup, script)
    before = procs.cpu_seconds(pid)
    load_before = sum(procs.cpu_seconds(p) for p in load_pids) + _children_cpu()
    result = wrk(url, args.connections, args.seconds, script)
    requests = max(result.requests, 1)
    entry = result.to_json()
    entry["cpu_us_per_req"] = (procs.cpu_seconds(pid) - before) / requests * 1e6
    load_cpu = sum(procs.cpu_seconds(p) for p in load_pids) + _children_cpu() - load_before
    entry["load_cpu_us_per_req"] = load_cpu / requests * 1e6
    entry["load_cpu_busy"] = load_cpu / result.duration_s  # 1.0: the load CPU was the bottleneck
    print(f"{name:12} {result.rps:9.0f} req/s  p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
          f"errors {result.errors}  proxy cpu {entry['cpu_us_per_req']:.0f} us/req  "
          f"load cpu {entry['load_cpu_us_per_req']:.0f} us/req ({entry['load_cpu_busy']:.0%} busy)", flush=True)
    return entry


def sidecar_config(work: Path, up: upstream_module.Upstream, listen: int, admin: int) -> Path:
    ctx = candidates.Context(work, up, PROXY_CPU)
    path = candidates.sidecar_config(ctx, "intercept-sidecar", listen, admin)
    config = yaml.safe_load(path.read_text())
    config["tls"] = {"ca_file": str(up.certs.ca_file)}  # forward-proxy destinations: trust the test CA
    config["intercept"] = {"hosts": ["localhost"], "ca_dir": str(work / "ca")}
    config["resolve"] = {"localhost": "127.0.0.1"}
    config["policy"]["connect_ports"] = [up.h1_port]
    path.write_text("# generated by bench/intercept_load.py\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="forward, intercepted, aiohttp interleaved, N times")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="configs, logs, certificates of the run")
    parser.add_argument("--profile", action="store_true",
                        help="after the recorded runs, a forward and an intercepted run under py-spy (bench/profile.py)")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "curl", "cc", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (scripts/install-system-deps.sh)")
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    forwarder_bin = work / "connect_forward"
    subprocess.run(["cc", "-O2", "-o", str(forwarder_bin), str(ROOT / "bench" / "connect_forward.c")], check=True,
                   timeout=60)
    up = upstream_module.start(work / "upstream", LOAD_CPU, 1 << 20)
    started: list[procs.Started] = [up.started]
    results: dict[str, Any] = {"connections": args.connections, "seconds": args.seconds, "rounds": []}
    try:
        listen, admin, forward_port, peer_port = procs.free_ports(4)
        config = sidecar_config(work, up, listen, admin)
        # Both proxies run on the proxy CPU the whole time; only the one under load is busy.
        sidecar = procs.spawn("sidecar", procs.pinned(PROXY_CPU, [
            str(Path(sys.executable).parent / "egress-sidecar"), "run", "--config", str(config)]),
            work / "sidecar.log")
        started.append(sidecar)
        peer = procs.spawn("aiohttp", procs.pinned(PROXY_CPU, [
            sys.executable, str(ROOT / "bench" / "peers" / "aiohttp_proxy.py"), "--port", str(peer_port),
            "--upstream", up.url(""), "--prefix", "/up", "--ca-file", str(up.certs.ca_file)]), work / "aiohttp.log")
        started.append(peer)
        procs.wait_for(lambda: sidecar.check_alive() and _ok(f"http://127.0.0.1:{admin}/readyz"), 15, "sidecar ready")
        procs.wait_for(lambda: peer.check_alive() and _ok(f"http://127.0.0.1:{peer_port}/up/100b"), 15, "aiohttp")
        forwarder = procs.spawn("connect_forward", procs.pinned(LOAD_CPU, [
            str(forwarder_bin), str(forward_port), str(listen), f"localhost:{up.h1_port}"]), work / "forward.log")
        started.append(forwarder)
        procs.wait_for(lambda: forwarder.check_alive() and "listening" in forwarder.log_tail(), 5, "forwarder")
        _check_intercepted_bytes(work, listen, up)
        lua = work / "absolute_form.lua"
        lua.write_text(f'wrk.headers["Host"] = "localhost:{up.h1_port}"\n'
                       f'request = function() return wrk.format("GET", "http://localhost:{up.h1_port}/100b") end\n')
        upstream_pids = procs.descendants(up.started.pid)
        results["route"] = measured("route", f"http://127.0.0.1:{listen}/up/100b", sidecar.pid, args, upstream_pids)
        for number in range(1, args.rounds + 1):
            print(f"round {number}", flush=True)
            results["rounds"].append({
                "forward": measured("forward", f"http://127.0.0.1:{listen}/", sidecar.pid, args, upstream_pids, lua),
                "intercepted": measured("intercepted", f"https://localhost:{forward_port}/100b", sidecar.pid, args,
                                        [*upstream_pids, forwarder.pid]),
                "aiohttp": measured("aiohttp", f"http://127.0.0.1:{peer_port}/up/100b", peer.pid, args, upstream_pids),
            })
        if args.profile and profile.available():
            for name, url, script in (("forward", f"http://127.0.0.1:{listen}/", lua),
                                      ("intercepted", f"https://localhost:{forward_port}/100b", None)):
                raw = work / f"profile-{name}.txt"
                sampler = profile.start(sidecar.pid, args.seconds, raw, LOAD_CPU)
                wrk(url, args.connections, args.seconds, script)
                profile.finish(sampler, args.seconds + 30)
                results[f"profile_{name}"] = summary = profile.summarize(raw, top=25)
                print(f"profile {name}: {summary['samples']} busy samples")
                for frame, share in summary["self"]:
                    print(f"  self {share:5.1f}%  {frame}")
        metrics = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{admin}/metrics"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        results["intercepted_counted"] = sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith("egress_intercepted_requests_total{"))
    finally:
        for process in reversed(started):
            if process.alive():
                procs.stop(process)
    # Per round (the three measured back to back, so a busy machine weighs on all three alike), then
    # the median round; CPU per request is the steadier figure when other work shares the machine.
    ratios = [{"intercepted_vs_forward": r["intercepted"]["rps"] / r["forward"]["rps"],
               "intercepted_vs_aiohttp": r["intercepted"]["rps"] / r["aiohttp"]["rps"],
               "forward_cpu_vs_intercepted_cpu": r["forward"]["cpu_us_per_req"] / r["intercepted"]["cpu_us_per_req"]}
              for r in results["rounds"]]
    results["ratios"] = {key: round(statistics.median(r[key] for r in ratios), 3) for key in ratios[0]}
    for number, r in enumerate(ratios, 1):
        print(f"round {number}: intercepted/forward {r['intercepted_vs_forward']:.2f}x  "
              f"intercepted/aiohttp {r['intercepted_vs_aiohttp']:.2f}x  "
              f"cpu forward/intercepted {r['forward_cpu_vs_intercepted_cpu']:.2f}")
    median = results["ratios"]
    print(f"median: intercepted / forward http:// = {median['intercepted_vs_forward']:.2f}x (goal >= 0.75)  "
          f"intercepted / aiohttp = {median['intercepted_vs_aiohttp']:.2f}x (goal >= 1.0)  "
          f"CPU per request forward / intercepted = {median['forward_cpu_vs_intercepted_cpu']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    errors = results["route"]["errors"] + sum(m["errors"] for r in results["rounds"] for m in r.values())
    return 0 if errors == 0 else 1


def _ok(url: str) -> bool:
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url],
                          capture_output=True, text=True, timeout=10, check=False)
    return done.stdout == "200"


def _check_intercepted_bytes(work: Path, listen: int, up: upstream_module.Upstream) -> None:
    """`/1m` byte-exact through an intercepted tunnel, trusting only the sidecar's bundle."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "1m"
        env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": f"http://127.0.0.1:{listen}",
               "https_proxy": f"http://127.0.0.1:{listen}", "CURL_CA_BUNDLE": str(work / "ca" / "bundle.pem")}
        done = subprocess.run(["curl", "-sS", "--fail", "--max-time", "20", "-o", str(out),
                               f"https://localhost:{up.h1_port}/1m"], env=env, capture_output=True, text=True,
                              timeout=30, check=False)
        if done.returncode != 0 or hashlib.sha256(out.read_bytes()).hexdigest() != up.digests["/1m"]:
            raise RuntimeError(f"intercepted /1m is not byte-exact: {done.stderr.strip()}")


if __name__ == "__main__":
    sys.exit(main())
