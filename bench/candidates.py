"""The candidates, each fronting the same upstream: how to start one and where to send load.

Every proxy answers `GET <base>/100b`, `<base>/1m` and `<base>/stream` by fetching the same path
from the upstream nginx. Proxies run pinned to the proxy CPU; `direct` has no process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import procs
from bench import upstream as upstream_module

ROOT = Path(__file__).resolve().parent.parent
OURS = "sidecar"


@dataclass(frozen=True)
class Candidate:
    name: str
    description: str
    base_url: str                      # `<base_url>/100b` is the small-body URL
    argv: Sequence[str] = ()           # empty: nothing to start (direct)
    proxies: bool = True               # False: no upstream behind it (hello world)
    readiness_url: str | None = None   # its own readiness endpoint, if it has one
    metrics_url: str | None = None     # scraped once after the load: proves metrics were on
    access_log: Path | None = None     # where its access log goes, if it keeps one (lines are counted)
    python: bool = False               # a Python process: py-spy can profile it (--profile)
    ca_file: Path | None = None        # for HTTPS base URLs (direct)
    config_file: Path | None = None
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Context:
    work: Path
    upstream: upstream_module.Upstream
    proxy_cpu: int | None


def _bin(name: str) -> str:
    """A console script of the running venv (the harness runs under the project's venv)."""
    return str(Path(sys.executable).parent / name)


def sidecar_config(ctx: Context, name: str, listen_port: int, admin_port: int) -> Path:
    """bench/sidecar.yaml with this run's ports and CA filled in, written into the work dir."""
    config = yaml.safe_load((ROOT / "bench" / "sidecar.yaml").read_text())
    config["listen"]["port"] = listen_port
    config["admin"]["port"] = admin_port
    for route in config["routes"]:
        route["upstream"] = ctx.upstream.url("", http2=bool(route.get("http2")))
        route["tls"]["ca_file"] = str(ctx.upstream.certs.ca_file)
    path = ctx.work / f"{name}.yaml"
    path.write_text("# generated from bench/sidecar.yaml for one run\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def sidecar(ctx: Context, name: str = OURS, prefix: str = "/up") -> Candidate:
    listen, admin = procs.free_ports(2)
    config = sidecar_config(ctx, name, listen, admin)
    return Candidate(
        name=name,
        description=f"egress-sidecar, route {prefix} (default config + route, metrics, access log to file)",
        base_url=f"http://127.0.0.1:{listen}{prefix}",
        argv=procs.pinned(ctx.proxy_cpu, [_bin("egress-sidecar"), "run", "--config", str(config)]),
        readiness_url=f"http://127.0.0.1:{admin}/readyz",
        metrics_url=f"http://127.0.0.1:{admin}/metrics",
        config_file=config,
        access_log=ctx.work / f"{name}.log",  # the sidecar logs to stdout, which the harness sends here
        python=True,
    )


def aiohttp_peer(ctx: Context) -> Candidate:
    (port,) = procs.free_ports(1)
    return Candidate(
        name="aiohttp",
        description="aiohttp server + one ClientSession (uvloop, pool 100, streaming, no access log)",
        base_url=f"http://127.0.0.1:{port}/up",
        argv=procs.pinned(ctx.proxy_cpu, [
            sys.executable, str(ROOT / "bench" / "peers" / "aiohttp_proxy.py"), "--port", str(port),
            "--upstream", ctx.upstream.url(""), "--prefix", "/up",
            "--ca-file", str(ctx.upstream.certs.ca_file)]),
        python=True,
    )


NGINX_PROXY_CONF = """\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx-proxy.pid;
error_log {dir}/nginx-proxy-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {dir}/nginx-proxy-access.log combined buffer=64k flush=1s;
{temp_paths}
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  upstream bench_upstream {{
    server 127.0.0.1:{upstream_port};
    keepalive 100;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen 127.0.0.1:{port};
    location /up/ {{
      proxy_pass https://bench_upstream/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""


def nginx_proxy(ctx: Context) -> Candidate:
    (port,) = procs.free_ports(1)
    work = ctx.work / "nginx-proxy"
    work.mkdir(exist_ok=True)
    work.chmod(0o755)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_PROXY_CONF.format(
        user=upstream_module.user_line(), dir=work, temp_paths=upstream_module.temp_paths(work),
        upstream_port=ctx.upstream.h1_port, port=port, ca=ctx.upstream.certs.ca_file))
    return Candidate(
        name="nginx",
        description="nginx, plain HTTP in, HTTPS out, upstream keepalive 100, buffered access log",
        base_url=f"http://127.0.0.1:{port}/up",
        argv=procs.pinned(ctx.proxy_cpu, ["nginx", "-e", str(work / "nginx-proxy-error.log"),
                                          "-p", str(work), "-c", str(conf)]),
        config_file=conf,
        access_log=work / "nginx-proxy-access.log",
    )


def hello(ctx: Context) -> Candidate:
    (port,) = procs.free_ports(1)
    return Candidate(
        name="hello",
        description="uvicorn raw-ASGI hello world, 100 B, no upstream (the ceiling)",
        base_url=f"http://127.0.0.1:{port}/up",
        argv=procs.pinned(ctx.proxy_cpu, [
            sys.executable, "-m", "uvicorn", "bench.peers.hello_asgi:app", "--host", "127.0.0.1",
            "--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
            "--log-level", "warning"]),
        proxies=False,
        python=True,
    )


def direct(ctx: Context) -> Candidate:
    return Candidate(
        name="direct",
        description="wrk/curl straight to the upstream nginx over HTTPS (no proxy)",
        base_url=ctx.upstream.url(""),
        ca_file=ctx.upstream.certs.ca_file,
    )


BUILDERS = {
    OURS: sidecar,
    "sidecar-h2": lambda ctx: sidecar(ctx, name="sidecar-h2", prefix="/h2"),
    "aiohttp": aiohttp_peer,
    "nginx": nginx_proxy,
    "hello": hello,
    "direct": direct,
}
ORDER = ["direct", OURS, "sidecar-h2", "aiohttp", "nginx", "hello"]
PEERS = ["aiohttp", "nginx", "hello", "direct"]
