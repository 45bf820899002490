"""`make demo`: the sidecar in front of a local HTTPS upstream, a 200 and a 403, no internet needed.

What it does, all on 127.0.0.1:
1. makes a throw-away CA and a certificate for `localhost` (trustme), and starts a small HTTPS
   server with it (the "upstream");
2. writes a sidecar config with one route, `/demo` -> that upstream, trusting the CA, and
   starts `egress-sidecar run` with it;
3. sends two requests through the sidecar, printing each as a curl command and its answer:
   the route (200, relayed from the upstream over TLS) and a forward-proxy request for the
   cloud metadata address 169.254.169.254 (403, refused by the egress policy before any
   packet leaves: nothing is sent anywhere);
4. on a terminal, keeps running so you can try more (Ctrl-C stops it); otherwise stops.

Ports: 15001 (data) and 15090 (admin) when free, else any free ones (printed); `--any-port`
skips the first try.
"""

from __future__ import annotations

import argparse
import http.server
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import trustme

UPSTREAM_BODY = b"hello from the local HTTPS upstream\n"


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = UPSTREAM_BODY + f"you asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass


def _port(preferred: int) -> int:
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port")


def start_upstream(ca: trustme.CA) -> http.server.ThreadingHTTPServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def config_text(listen: int, admin: int, upstream: int, ca_file: Path) -> str:
    return f"""\
listen: {{port: {listen}}}
admin: {{host: 127.0.0.1, port: {admin}}}
tls: {{ca_file: {ca_file}}}   # trust the demo CA instead of the system bundle
policy:
  allow_cidrs: [127.0.0.1/32]   # the demo upstream is on loopback, which is denied by default
routes:
  - {{name: demo, prefix: /demo, upstream: "https://localhost:{upstream}"}}
log: {{format: json}}
drain: {{grace: 2s}}
"""


def request(url: str, proxy: str | None = None) -> tuple[int, dict[str, str], str]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def wait_ready(admin: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the sidecar exited with {proc.returncode}")
        try:
            if request(f"http://127.0.0.1:{admin}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("demo: the sidecar did not become ready")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="keep running after the two requests (default: on a terminal)")
    parser.add_argument("--any-port", action="store_true",
                        help="do not try 15001 and 15090 first (the tests run it beside other sidecars)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="egress-demo-"))
    ca = trustme.CA()
    ca_file = work / "demo-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = start_upstream(ca)
    listen, admin = (_port(0), _port(0)) if args.any_port else (_port(15001), _port(15090))
    config = work / "demo.yaml"
    config.write_text(config_text(listen, admin, upstream.server_address[1], ca_file))
    print(f"demo: local HTTPS upstream on https://localhost:{upstream.server_address[1]}")
    print(f"demo: sidecar config {config}:\n")
    print("    " + config.read_text().replace("\n", "\n    ").rstrip() + "\n")
    log = open(work / "sidecar.log", "wb")  # noqa: SIM115 - open for the sidecar's lifetime
    # The demo's config is the whole story: EGRESS_* variables of the caller would override it.
    env = {name: value for name, value in os.environ.items() if not name.startswith("EGRESS_")}
    sidecar = subprocess.Popen([sys.executable, "-m", "sidecar", "run", "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(admin, sidecar)
        print(f"demo: sidecar ready: data http://127.0.0.1:{listen}, admin http://127.0.0.1:{admin}\n")
        data = f"http://127.0.0.1:{listen}"
        shown = [
            (f"curl -i {data}/demo/hello", f"{data}/demo/hello", None),
            (f"curl -i -x {data} http://169.254.169.254/latest/meta-data/",
             "http://169.254.169.254/latest/meta-data/", data),
        ]
        for command, url, proxy in shown:
            status, headers, body = request(url, proxy)
            print(f"$ {command}")
            print(f"HTTP/1.1 {status}")
            for name in ("x-egress-error", "content-type"):
                if name in {k.lower() for k in headers}:
                    value = next(v for k, v in headers.items() if k.lower() == name)
                    print(f"{name}: {value}")
            print(f"\n{body}")
        print(f"demo: metrics: curl -s http://127.0.0.1:{admin}/metrics | grep egress_requests_total")
        if args.keep:
            print(f"demo: the sidecar logs to {work / 'sidecar.log'}")
            print("demo: still running; try the commands above. Ctrl-C stops it.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    finally:
        if sidecar.poll() is None:
            sidecar.send_signal(signal.SIGTERM)
            try:
                sidecar.wait(10)
            except subprocess.TimeoutExpired:
                sidecar.kill()
                sidecar.wait(5)
        log.close()
        upstream.shutdown()
    print("demo: stopped. The sidecar logged one JSON line per request:\n")
    for line in (work / "sidecar.log").read_text().splitlines():
        if '"event":"access"' in line or '"event":"egress_error"' in line:
            print(f"    {line}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
