"""The egress lock's transparent path beside the paths the app opts into, in one run.

    sudo python -m bench.transparent           # as root: it builds its own sealed namespaces
    python -m bench.transparent --quick

Inside a private network namespace (re-executed under `unshare --net --mount`), the sealed
test harness's pod and world (tests/sealed/pod.py: two namespaces joined by a veth pair,
nothing routed beyond) get: nginx in the world on a "public" address (plain HTTP :8080, TLS
:8443), the real `egress-sidecar lock` and the sidecar (UID 65532) in the pod, and the load
(wrk, curl) in the pod as UID 1000. Side by side:

- plain HTTP, c32 keep-alive, /100b: transparent (wrk straight at the address, captured) vs
  forward-proxy form (wrk at the sidecar's port with absolute-form targets); goal >= 0.9x;
- tunnels: captured TLS vs CONNECT: new tunnels/s (each a full TLS handshake, curl
  --parallel, Connection: close) and MiB/s through one tunnel; goal >= 0.9x each.
Nothing here leaves the machine: the world has no route beyond the veth pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.load import parse_wrk  # noqa: E402
from bench.procs import cpu_seconds  # noqa: E402
from bench.upstream import Certs, temp_paths, user_line  # noqa: E402

INNER_ENV = "EGRESS_BENCH_TRANSPARENT_INNER"
ADDRESS = "93.184.216.34"
HOST = "upstream.test"
MIB = 1024 * 1024
APP_UID = 1000

NGINX = """\
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp_paths}
  sendfile on;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_session_cache off;
  server {{
    listen {address}:8080;
    listen {address}:8443 ssl;
    root {dir}/www;
    location = /100b {{ default_type text/plain; return 200 "{small}"; }}
  }}
}}
"""


def _inner(quick: bool) -> dict[str, Any]:
    from tests.sealed import pod
    from tests.sealed.locked import PORTS, start

    work = Path(tempfile.mkdtemp(prefix="egress-bench-transparent-"))
    os.chmod(work, 0o755)
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(HOST)
    certs = Certs(work / "ca.pem", work / "server.pem", work / "server.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    server.private_key_pem.write_to_path(str(certs.key_file))
    with open(certs.cert_file, "wb") as chain:
        chain.writelines(blob.bytes() for blob in server.cert_chain_pems)
    (work / "www").mkdir()
    stream_mib = 16 if quick else 64
    (work / "www" / "stream").write_bytes(os.urandom(stream_mib * MIB))
    for path in work.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    config = {"policy": {"plain_http_hosts": [HOST], "connect_ports": [8443]}, "resolve": {HOST: ADDRESS},
              "log": {"access": False, "format": "json", "level": "warning"}}
    nginx: subprocess.Popen[bytes] | None = None

    def world(locked: Any) -> None:
        nonlocal nginx
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / kind).mkdir(exist_ok=True)
        (work / "nginx.conf").write_text(NGINX.format(
            user=user_line(), dir=work, temp_paths=temp_paths(work), cert=certs.cert_file, key=certs.key_file,
            address=ADDRESS, small="x" * 100))
        nginx = subprocess.Popen(["nsenter", f"--net=/run/netns/{locked.net.world}", "nginx", "-c",
                                  str(work / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert ADDRESS in pod.WORLD_TARGETS_V4  # the harness puts it on the world's lo
    locked = start("bench", ca.cert_pem.bytes(), config, before_lock=world)
    results: dict[str, Any] = {}
    try:
        duration = 2 if quick else 4
        proxy = f"http://127.0.0.1:{PORTS['listen']}"

        assert locked.sidecar is not None
        sidecar_pid = locked.sidecar.pid  # nsenter and setpriv exec: this is the sidecar's python
        cpu: dict[str, float] = {}
        units: dict[str, float] = {}

        def measured(key: str, count: float, cpu_before: float) -> None:
            cpu[key] = cpu.get(key, 0.0) + cpu_seconds(sidecar_pid) - cpu_before
            units[key] = units.get(key, 0.0) + count

        def app(argv: list[str], timeout: float = 120) -> str:
            done = locked.net.run(["nice", "-n", "10", *argv], uid=APP_UID, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"{argv[0]} failed: {done.stderr.decode()[-500:]}")
            return done.stdout.decode()

        script = work / "absolute.lua"
        script.write_text(f'request = function() return wrk.format(nil, "http://{HOST}:8080/100b") end\n')
        os.chmod(script, 0o644)
        wrk = ["wrk", "-t1", "-c32", f"-d{duration}s", "--latency", "-H", f"Host: {HOST}:8080"]
        app([*wrk[:3], "-d1s", f"http://{ADDRESS}:8080/100b"])  # warm-up
        # The machine is shared: rounds alternate the two paths, and each path's best round counts.
        rounds = 2 if quick else 3
        captured: list[Any] = []
        forward: list[Any] = []
        for _ in range(rounds):
            before = cpu_seconds(sidecar_pid)
            captured.append(parse_wrk(app([*wrk, f"http://{ADDRESS}:8080/100b"]), 32))
            measured("http-transparent", captured[-1].requests, before)
            before = cpu_seconds(sidecar_pid)
            forward.append(parse_wrk(app([*wrk, "-s", str(script), proxy]), 32))
            measured("http-forward", forward[-1].requests, before)
        best_captured, best_forward = max(r.rps for r in captured), max(r.rps for r in forward)
        results["plain_http"] = {"transparent_rps": best_captured, "forward_rps": best_forward,
                                 "errors": sum(r.errors for r in captured + forward),
                                 "ratio": best_captured / best_forward if best_forward else 0.0}

        curl = ["curl", "-sS", "--cacert", str(certs.ca_file)]
        resolve = ["--resolve", f"{HOST}:8443:{ADDRESS}"]
        connect = ["--proxy", proxy]
        count = 100 if quick else 400

        def tunnels_per_second(via: list[str]) -> float:
            outputs = [part for _ in range(count) for part in ("-o", "/dev/null", f"https://{HOST}:8443/100b")]
            started = time.perf_counter()
            app([*curl, *via, "--parallel", "--parallel-max", "8", "-H", "Connection: close",
                 "--no-sessionid", *outputs], timeout=300)
            return count / (time.perf_counter() - started)

        def mib_per_second(via: list[str]) -> float:
            out = app([*curl, *via, "-o", "/dev/null", "-w", "%{speed_download}", f"https://{HOST}:8443/stream"],
                      timeout=300)
            return float(out) / MIB

        new = {"transparent": 0.0, "connect": 0.0}
        bulk = {"transparent": 0.0, "connect": 0.0}
        for _ in range(rounds):  # alternating, best of each (see above)
            for name, via in (("transparent", resolve), ("connect", connect)):
                before = cpu_seconds(sidecar_pid)
                new[name] = max(new[name], tunnels_per_second(via))
                measured(f"tunnel-{name}", count, before)
                bulk[name] = max(bulk[name], mib_per_second(via))
        results["tunnels"] = {
            "new_per_s": {**new, "ratio": new["transparent"] / new["connect"]},
            "mib_per_s": {**bulk, "ratio": bulk["transparent"] / bulk["connect"]},
        }
        # Sidecar CPU per unit of work: steadier than throughput on a shared machine.
        results["cpu_us"] = {key: 1e6 * cpu[key] / units[key] for key in cpu}
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        locked.stop()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if os.environ.get(INNER_ENV):
        print(json.dumps(_inner(args.quick)))
        return 0
    if os.geteuid() != 0:
        print("bench.transparent: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    outer_mnt = os.readlink("/proc/self/ns/mnt")
    done = subprocess.run(["unshare", "--net", "--mount", sys.executable, "-m", "bench.transparent",
                           *(["--quick"] if args.quick else [])], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, INNER_ENV: "1", "EGRESS_SEALED_OUTER_MNT": outer_mnt}, timeout=900)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        return 1
    results = json.loads(done.stdout.strip().splitlines()[-1])
    plain, tunnels = results["plain_http"], results["tunnels"]
    print("| path | transparent | opt-in path | ratio (goal >= 0.9) |")
    print("|---|---|---|---|")
    print(f"| plain HTTP c32 /100b, req/s | {plain['transparent_rps']:.0f} | forward-proxy "
          f"{plain['forward_rps']:.0f} | {plain['ratio']:.2f} |")
    for key, label in (("new_per_s", "new TLS tunnels/s (8 parallel)"), ("mib_per_s", "MiB/s through one tunnel")):
        row = tunnels[key]
        print(f"| {label} | {row['transparent']:.1f} | CONNECT {row['connect']:.1f} | {row['ratio']:.2f} |")
    per = results["cpu_us"]
    print(f"| sidecar CPU per request, us | {per['http-transparent']:.0f} | forward-proxy "
          f"{per['http-forward']:.0f} | {per['http-forward'] / per['http-transparent']:.2f} |")
    print(f"| sidecar CPU per new tunnel, us | {per['tunnel-transparent']:.0f} | CONNECT "
          f"{per['tunnel-connect']:.0f} | {per['tunnel-connect'] / per['tunnel-transparent']:.2f} |")
    ok = plain["ratio"] >= 0.9 and all(tunnels[k]["ratio"] >= 0.9 for k in tunnels) and plain["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
