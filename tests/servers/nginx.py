"""A real nginx TLS upstream for the tests (HTTP/2 via ALPN), run as a child process in a tmp dir.

nginx cannot report a port it chose, so the port comes from `free_port()` and start-up is
retried if another process took it in between. The access log records, per request, the
protocol nginx spoke, its connection serial number and the request count on that connection,
so tests can assert what the upstream saw. Stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.processes import stop_process
from tests.servers.upstream import wait_until

NGINX = "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "nginx"
# One line per request: protocol, connection serial, requests so far on it, method, URI, status,
# and the file nginx kept the request body in ("-" if it read none; /post keeps every body).
LOG_FORMAT = ("$server_protocol $connection $connection_requests $request_method $request_uri $status "
              "$request_body_file")


@dataclass(frozen=True)
class Logged:
    protocol: str
    connection: int
    connection_requests: int
    method: str
    uri: str
    status: int
    body_file: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NginxUpstream:
    def __init__(self, ca: trustme.CA, workdir: Path, keepalive_requests: int = 1000,
                 max_concurrent_streams: int = 128, alpn_http2: bool = True) -> None:
        self.dir = workdir
        self.keepalive_requests = keepalive_requests
        self.max_concurrent_streams = max_concurrent_streams
        self.alpn_http2 = alpn_http2  # False: plain HTTP/1.1 server (ALPN offers only http/1.1)
        self.sink_port = 0
        self.cert = ca.issue_cert("localhost", "127.0.0.1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def _config(self) -> str:
        d = self.dir
        # nginx started as root drops its workers to `nobody`, who cannot read a 0700 tmp dir.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"  {name}_temp_path {d}/{name};\n" for name in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
        return f"""{user}worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  log_format egress '{LOG_FORMAT}';
  access_log {d}/access.log egress;
{temp}  server {{
    listen 127.0.0.1:{self.port} ssl{" http2" if self.alpn_http2 else ""};
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    keepalive_requests {self.keepalive_requests};
    http2_max_concurrent_streams {self.max_concurrent_streams};
    client_max_body_size 16m;
    location = /hello {{ return 200 "hello $server_protocol\\n"; }}
    # 32 KiB at 32 KiB/s: each response takes about a second, so overlap shows concurrency.
    location = /slow {{ root {d}/www; limit_rate 32k; }}
    # 444: nginx closes the request without a response; on HTTP/2 that is RST_STREAM.
    location = /rst {{ return 444; }}
    # A 1 MiB file of random bytes (www/1m) for downloads.
    location = /1m {{ root {d}/www; }}
    # The same at 64 KiB/s: a download that lasts ~16 s, to be left half-way.
    location = /1m-slow {{ alias {d}/www/1m; limit_rate 64k; }}
    # Every request body read in full and kept in its own file (logged), then answered by the sink.
    location = /post {{ client_body_in_file_only on; proxy_pass http://127.0.0.1:{self.sink_port}/sink; }}
    location / {{ return 404; }}
  }}
  server {{
    listen 127.0.0.1:{self.sink_port};
    access_log off;
    location / {{ return 200 "stored\n"; }}
  }}
}}
"""

    def start(self) -> NginxUpstream:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        self.cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        (self.dir / "www").mkdir(exist_ok=True)
        (self.dir / "www" / "slow").write_bytes(b"x" * 32768)
        (self.dir / "www" / "1m").write_bytes(os.urandom(1024 * 1024))
        for _ in range(5):
            self.port = _free_port()
            self.sink_port = _free_port()
            (self.dir / "nginx.conf").write_text(self._config())
            self.access_log.write_text("")
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log"),
                 "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if wait_until(lambda: self._listening() or self.proc.poll() is not None,  # type: ignore[union-attr]
                          timeout=10, message="nginx listening") and self.proc.poll() is None:
                return self
        raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()[-2000:]}")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def logged(self) -> list[Logged]:
        entries = []
        for line in self.access_log.read_text().splitlines():
            protocol, connection, count, method, uri, status, body_file = line.split(" ")
            entries.append(Logged(protocol, int(connection), int(count), method, uri, int(status), body_file))
        return entries

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)  # the master stops its workers
