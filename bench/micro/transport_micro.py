"""Micro-benchmark: our HTTP11Transport vs httpx's AsyncHTTPTransport, transport only.

Both are driven the way the sidecar's forward path drives them: build an `httpx.Request`, call
`handle_async_request`, read the body with `aiter_raw`, close. The upstream is nginx over TLS
on 127.0.0.1 (100-byte answers), pinned to the last CPU; this process is pinned to the first.
Reports CPU microseconds per request (time.process_time of this process only) and requests
per second at concurrency 1 and 32, next to a floor: a bare uvloop TLS protocol writing a fixed
request and waiting for the fixed answer (no HTTP parsing, no httpx objects). Every run is
bounded in count and in time.

    .venv/bin/python -m bench.micro.transport_micro [--requests 5000] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trustme
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from sidecar.upstream.transport import HTTP11Transport

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BODY = "x" * 100
TIMEOUTS = {"connect": 5.0, "read": 10.0, "write": 10.0, "pool": 10.0}
STREAM_BYTES = 100 << 20

NGINX_CONF = """
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location / {{ default_type text/plain; return 200 "{body}"; }}
        location = /stream {{ alias {dir}/stream.bin; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def nginx_upstream(ca: trustme.CA, cpu: int | None) -> Iterator[int]:
    """nginx serving 100 bytes over TLS on an ephemeral loopback port; stopped by its PID."""
    workdir = Path(tempfile.mkdtemp(prefix="transport-bench-"))
    workdir.chmod(0o755)  # nginx workers (often `nobody`) read /stream's file from here
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(workdir / "key.pem"))
    with open(workdir / "stream.bin", "wb") as out:  # 100 MiB of random bytes for /stream
        out.writelines(os.urandom(1 << 20) for _ in range(STREAM_BYTES >> 20))
    for _attempt in range(5):
        port = _free_port()  # nginx cannot bind port 0; retry if someone takes it meanwhile
        (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, port=port, body=BODY))
        command = [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"]
        if cpu is not None:
            command = ["taskset", "-c", str(cpu), *command]
        process = subprocess.Popen(command, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        up = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                up = True
                break
            except OSError:
                time.sleep(0.02)
        if up:
            break
        process.kill()
        process.wait()
    else:
        raise RuntimeError(f"nginx did not start: {(workdir / 'error.log').read_text()}")
    try:
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _one(transport: httpx.AsyncBaseTransport, url: httpx.URL, host: str) -> None:
    request = httpx.Request("GET", url, headers=[("Host", host)], extensions={"timeout": TIMEOUTS})
    response = await transport.handle_async_request(request)
    stream = response.stream
    try:
        async for _chunk in stream:  # as sidecar/proxy/app.py relays it
            pass
    finally:
        await stream.aclose()  # type: ignore[union-attr]
    if response.status_code != 200:
        raise RuntimeError(f"status {response.status_code}")


async def _run(
    make: Callable[[], httpx.AsyncBaseTransport], url: httpx.URL, concurrency: int, requests: int, seconds: float
) -> dict[str, Any]:
    transport = make()
    host = url.netloc.decode()
    # Warm up: open the pool's connections and let caches settle; not measured.
    await asyncio.gather(*(_one(transport, url, host) for _ in range(concurrency * 4)))
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while done < requests and time.monotonic() < stop_at:
            done += 1
            await _one(transport, url, host)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    opened = getattr(transport, "connections_opened", None)
    await transport.aclose()
    return {
        "concurrency": concurrency,
        "requests": done,
        "seconds": round(wall, 3),
        "req_per_s": round(done / wall),
        "cpu_us_per_req": round(cpu / done * 1e6, 1),
        "connections_opened": opened,
    }


class _Bare(asyncio.Protocol):
    """The floor: a TLS connection that writes a fixed request and waits for the 100-byte
    body, with no HTTP parsing and no httpx objects. Only valid against the fixed nginx answer."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.endswith(BODY.encode()) and self.waiter is not None:
            self.buffer = b""
            self.waiter.set_result(None)


async def _floor(context: ssl.SSLContext, port: int, concurrency: int, requests: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    raw = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    protocols = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(_Bare, "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
        protocols.append(protocol)
    done = 0
    stop_at = time.monotonic() + seconds

    async def worker(protocol: _Bare) -> None:
        nonlocal done
        while done < requests and time.monotonic() < stop_at:
            done += 1
            protocol.waiter = loop.create_future()
            protocol.transport.write(raw)  # type: ignore[union-attr]
            await protocol.waiter

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(p) for p in protocols))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for protocol in protocols:
        protocol.transport.close()  # type: ignore[union-attr]
    return {"transport": "floor", "concurrency": concurrency, "requests": done, "seconds": round(wall, 3),
            "req_per_s": round(done / wall), "cpu_us_per_req": round(cpu / done * 1e6, 1),
            "connections_opened": concurrency}


async def _stream(make: Callable[[], httpx.AsyncBaseTransport], url: httpx.URL, times: int) -> dict[str, Any]:
    """Download /stream (100 MiB) `times` times, reading as fast as possible."""
    transport = make()
    host = url.netloc.decode()
    stream_url = url.copy_with(path="/stream")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    total = 0
    for _ in range(times):
        request = httpx.Request("GET", stream_url, headers=[("Host", host)], extensions={"timeout": TIMEOUTS})
        response = await transport.handle_async_request(request)
        stream = response.stream
        async for chunk in stream:  # type: ignore[union-attr]
            total += len(chunk)
        await stream.aclose()  # type: ignore[union-attr]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    await transport.aclose()
    if total != times * STREAM_BYTES:
        raise RuntimeError(f"short download: {total}")
    return {"mib_per_s": round(total / wall / (1 << 20)), "cpu_s_per_gib": round(cpu / (total / (1 << 30)), 2)}


def _request_build_cost(url: httpx.URL, n: int = 20000) -> float:
    host = url.netloc.decode()
    cpu0 = time.process_time()
    for _ in range(n):
        httpx.Request("GET", url, headers=[("Host", host)], extensions={"timeout": TIMEOUTS})
    return round((time.process_time() - cpu0) / n * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests per measured run (cap)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time cap per measured run")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--only", choices=["ours", "httpx", "floor"], help="run one candidate only (profiling)")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    bench_cpu, nginx_cpu = (cpus[0], cpus[-1]) if len(cpus) > 1 else (None, None)
    if bench_cpu is not None:
        os.sched_setaffinity(0, {bench_cpu})
    ca = trustme.CA()
    context = client_context(ca)
    candidates: dict[str, Callable[[], httpx.AsyncBaseTransport]] = {
        "ours": lambda: HTTP11Transport(context, max_connections=64),
        "httpx": lambda: httpx.AsyncHTTPTransport(
            verify=context, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64), trust_env=False
        ),
    }
    if args.only:
        candidates = {k: v for k, v in candidates.items() if k == args.only}
    results: list[dict[str, Any]] = []
    with nginx_upstream(ca, nginx_cpu) as port:
        url = httpx.URL(f"https://127.0.0.1:{port}/")
        build_us = _request_build_cost(url)
        if args.only in (None, "floor"):
            for concurrency in (1, 32):
                results.append(uvloop.run(_floor(context, port, concurrency, args.requests, args.seconds)))
        streams: dict[str, dict[str, Any]] = {}
        for name, make in candidates.items():
            for concurrency in (1, 32):
                row = uvloop.run(_run(make, url, concurrency, args.requests, args.seconds))
                row["transport"] = name
                results.append(row)
            streams[name] = uvloop.run(_stream(make, url, 3))
    print(f"httpx.Request construction alone: {build_us} us CPU (included in every row below)")
    print(f"{'transport':<10} {'conc':>4} {'requests':>8} {'req/s':>8} {'CPU us/req':>10} {'conns':>6}")
    for row in results:
        print(f"{row['transport']:<10} {row['concurrency']:>4} {row['requests']:>8} {row['req_per_s']:>8} "
              f"{row['cpu_us_per_req']:>10} {row['connections_opened'] or '-':>6}")
    by = {(r["transport"], r["concurrency"]): r for r in results}
    for concurrency in (1, 32):
        if ("ours", concurrency) in by and ("httpx", concurrency) in by:
            ours, theirs = by[("ours", concurrency)], by[("httpx", concurrency)]
            print(f"c{concurrency}: ours/httpx req/s {ours['req_per_s'] / theirs['req_per_s']:.1f}x, "
                  f"CPU per request {theirs['cpu_us_per_req'] / ours['cpu_us_per_req']:.1f}x less")
    for name, row in streams.items():
        print(f"{name}: 100 MiB download x3: {row['mib_per_s']} MiB/s, {row['cpu_s_per_gib']} s CPU per GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"request_build_us": build_us, "results": results,
                                               "stream": streams}, indent=2))


if __name__ == "__main__":
    main()
