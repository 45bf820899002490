"""The HTTPS upstream every candidate fronts: one nginx on 127.0.0.1, pinned to the load's CPU.

It serves `/100b` (a `return 200` of 100 bytes), `/1m` and `/stream` (files of 1 MiB and, by
default, 100 MiB of random bytes) over TLS on an HTTP/1.1 port and an HTTP/2 port, with
keep-alive on, and `stub_status` on a plain-HTTP status port: its `accepts` counter is how the
harness counts the TLS connections each candidate opened upstream (every accepted connection
on the TLS ports does one handshake).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import re
from dataclasses import dataclass
from pathlib import Path

import trustme

from bench import procs
from bench.bodies import MIB, SMALL_BODY, write_body


@dataclass(frozen=True)
class Certs:
    ca_file: Path
    cert_file: Path  # server certificate chain
    key_file: Path


def make_certs(directory: Path) -> Certs:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    server.private_key_pem.write_to_path(str(certs.key_file))
    with open(certs.cert_file, "wb") as chain:
        chain.writelines(blob.bytes() for blob in server.cert_chain_pems)
    return certs


def temp_paths(directory: Path) -> str:
    """nginx's temp-path directives pointed into our work dir (the defaults need /var/lib/nginx)."""
    return "\n".join(f"  {kind}_temp_path {directory}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def user_line() -> str:
    """As root, nginx's workers would switch to `nobody`, who cannot read our 0700 temp dirs."""
    return "user root;" if os.geteuid() == 0 else ""


@dataclass
class Upstream:
    h1_port: int
    h2_port: int
    status_port: int
    certs: Certs
    stream_bytes: int
    digests: dict[str, str]  # path -> sha256 of the body nginx serves there
    started: procs.Started
    probes: int = 0  # status requests made so far: each one is an accepted connection and a request

    def url(self, path: str, http2: bool = False) -> str:
        return f"https://127.0.0.1:{self.h2_port if http2 else self.h1_port}{path}"

    def counters(self) -> tuple[int, int]:
        """(accepted connections, requests) from stub_status, minus those of our own probes
        (this one included), so a before/after difference counts only other clients."""
        self.probes += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=5)
        try:
            conn.request("GET", "/status", headers={"Connection": "close"})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        match = re.search(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.MULTILINE)
        if not match:
            raise RuntimeError(f"unexpected stub_status output: {text!r}")
        accepts, _handled, requests = (int(group) for group in match.groups())
        return accepts - self.probes, requests - self.probes


NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {dir}/upstream.pid;
error_log {dir}/upstream-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp_paths}
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  server {{
    listen 127.0.0.1:{h1} ssl;
    listen 127.0.0.1:{h2} ssl http2;
    http2_max_requests 10000000;
    root {www};
    location = /100b {{ default_type text/plain; return 200 "{small}"; }}
    location = /1m {{ default_type application/octet-stream; }}
    location = /stream {{ default_type application/octet-stream; }}
  }}
  server {{
    listen 127.0.0.1:{status};
    location = /status {{ stub_status; }}
  }}
}}
"""


def _serving(upstream: Upstream) -> bool:
    return upstream.started.check_alive() and bool(upstream.counters())


def start(work: Path, cpu: int | None, stream_bytes: int) -> Upstream:
    """Write certs, bodies and config into `work`, start nginx pinned to `cpu`, wait until it answers."""
    work.mkdir(parents=True, exist_ok=True)
    www = work / "www"
    www.mkdir(exist_ok=True)
    for directory in (work, www):
        directory.chmod(0o755)
    certs = make_certs(work)
    digests = {
        "/100b": hashlib.sha256(SMALL_BODY).hexdigest(),
        "/1m": write_body(www / "1m", MIB),
        "/stream": write_body(www / "stream", stream_bytes),
    }
    last_error: Exception | None = None
    for _attempt in range(3):  # a port picked free can be taken by another process before nginx binds
        h1, h2, status = procs.free_ports(3)
        conf = work / "upstream.conf"
        conf.write_text(NGINX_CONF.format(
            user=user_line(), dir=work, temp_paths=temp_paths(work), cert=certs.cert_file,
            key=certs.key_file, h1=h1, h2=h2, status=status, www=www, small=SMALL_BODY.decode()))
        argv = procs.pinned(cpu, ["nginx", "-e", str(work / "upstream-error.log"), "-p", str(work),
                                  "-c", str(conf)])
        started = procs.spawn("upstream", argv, work / "upstream.log")
        upstream = Upstream(h1, h2, status, certs, stream_bytes, digests, started)
        try:
            procs.wait_for(functools.partial(_serving, upstream), 10, "upstream nginx status port")
            return upstream
        except (procs.Deadline, RuntimeError) as exc:  # e.g. the port was taken: try new ports
            last_error = exc
            procs.stop(started)
    raise RuntimeError(f"upstream nginx did not start: {last_error}; see {work}/upstream-error.log")
