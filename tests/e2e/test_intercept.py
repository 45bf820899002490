"""TLS interception end to end: real clients with HTTPS_PROXY and only the injected trust variables.

The sidecar intercepts `*.intercept.test` (one of them, `api.intercept.test`, through a route's
`match_hosts` that injects a credential) and tunnels everything else. The clients — curl, Python
requests, httpx, aiohttp and Node v20 (through a small CONNECT agent, Node 20 has no proxy
support of its own) — run as subprocesses whose environment is PATH, HTTPS_PROXY and exactly the
variables the webhook injects (sidecar/inject/patch.py trust_env), pointing at the bundle the
sidecar wrote. The upstream is a real TLS server on 127.0.0.1 that records, per connection, the
client certificate it was shown: a tunnel carries the app's own TLS session (its certificate
arrives), an intercepted request comes over the sidecar's pooled connection (none does).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trustme

from sidecar.inject.patch import trust_env
from tests.conftest import Sidecar, server_context
from tests.servers.upstream import Upstream, UpstreamServer, _Handler, random_bytes, wait_until

INTERCEPTED = "api.intercept.test"  # intercepted through the route's match_hosts (credential injected)
ALSO_INTERCEPTED = "other.intercept.test"  # intercepted through intercept.hosts only
TUNNELLED = "tunnel.test"
UNTRUSTED = "bad.intercept.test"  # intercepted, but its upstream's certificate is not trusted by the sidecar
CREDENTIAL = "Bearer route-secret"
POOL = 4
SIZE, SEED = 1 << 20, 19


@dataclass
class Recording:
    """An upstream that also records the client certificate (CN or None) of each TLS connection."""

    state: Upstream
    peers: list[str | None] = field(default_factory=list)


class RecordingServer(UpstreamServer):
    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(context)
        self.peers: list[str | None] = []

    async def _start(self) -> None:
        state = Upstream("127.0.0.1", 0, "https")
        peers = self.peers

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            cert = writer.get_extra_info("peercert")
            subject = dict(x[0] for x in cert["subject"]) if cert else {}
            peers.append(subject.get("commonName"))
            await _Handler(state, reader, writer).run()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.ssl_context, backlog=512)
        state.port = self.server.sockets[0].getsockname()[1]
        self.state = state


@pytest.fixture
def recording(ca: trustme.CA) -> Iterator[Recording]:
    context = server_context(ca, INTERCEPTED, ALSO_INTERCEPTED, TUNNELLED)
    context.verify_mode = ssl.CERT_OPTIONAL  # record a client certificate when one is offered
    ca.configure_trust(context)
    server = RecordingServer(context)
    state = server.start()
    yield Recording(state, server.peers)
    server.stop()


@pytest.fixture
def untrusted_upstream() -> Iterator[Upstream]:
    server = UpstreamServer(server_context(trustme.CA(), UNTRUSTED))  # a CA the sidecar does not trust
    yield server.start()
    server.stop()


@dataclass
class Setup:
    sidecar: Sidecar
    upstream: Recording
    env: dict[str, str]  # what an injected app container has
    ca_dir: Path

    def url(self, host: str, path: str, port: int | None = None) -> str:
        return f"https://{host}:{port or self.upstream.state.port}{path}"


@pytest.fixture
def setup(make_sidecar: Callable[..., Sidecar], recording: Recording, untrusted_upstream: Upstream,
          tmp_path: Path) -> Setup:
    ca_dir = tmp_path / "ca"
    sidecar = make_sidecar(
        intercept={"hosts": ["*.intercept.test"], "ca_dir": str(ca_dir)},
        routes=[{"name": "pay", "match_hosts": [INTERCEPTED],
                 "headers": {"authorization": {"value": CREDENTIAL}},
                 "retries": {"attempts": 2, "on": [503]}, "timeouts": {"read": "1s"}}],
        resolve={name: "127.0.0.1" for name in (INTERCEPTED, ALSO_INTERCEPTED, TUNNELLED, UNTRUSTED)},
        pool={"max_connections": POOL, "max_keepalive_connections": POOL},
        policy={"allow_cidrs": ["127.0.0.0/8"],
                "connect_ports": [recording.state.port, untrusted_upstream.port]},
    )
    proxy = f"http://127.0.0.1:{sidecar.port}"
    env = {"PATH": os.environ["PATH"], "HTTPS_PROXY": proxy, "https_proxy": proxy,
           **{entry["name"]: entry["value"] for entry in trust_env(str(ca_dir))}}
    return Setup(sidecar, recording, env, ca_dir)


def run(setup: Setup, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(argv, env=setup.env, capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done


PYTHON_CLIENTS = {
    "requests": "import requests, sys\n"
                "r = requests.get(sys.argv[1], timeout=30)\n"
                "sys.stdout.buffer.write(r.content)\n",
    "httpx": "import httpx, sys\n"
             "r = httpx.get(sys.argv[1], timeout=30)\n"
             "sys.stdout.buffer.write(r.content)\n",
    "aiohttp": "import aiohttp, asyncio, sys\n"
               "async def main():\n"
               "    async with aiohttp.ClientSession(trust_env=True) as s:\n"
               "        async with s.get(sys.argv[1]) as r:\n"
               "            sys.stdout.buffer.write(await r.read())\n"
               "asyncio.run(main())\n",
}

# Node 20 has no HTTPS_PROXY support: a CONNECT agent, as the usual npm agents do it. Unlike
# tests/e2e/connect_agent.js, which hands Node the CA to trust (`ca:` replaces Node's roots), this
# one passes no `ca`: the trust must come from NODE_EXTRA_CA_CERTS, as in an injected container.
NODE_CLIENT = r"""
const http = require('http'), https = require('https'), tls = require('tls');
const target = new URL(process.argv[2]), proxy = new URL(process.env.HTTPS_PROXY);
const authority = `${target.hostname}:${target.port || 443}`;
http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: authority, headers: {host: authority}})
  .on('connect', (res, socket) => {
    if (res.statusCode !== 200) { console.error('CONNECT', res.statusCode); process.exit(1); }
    const agent = new https.Agent({keepAlive: false});
    agent.createConnection = (options, cb) => tls.connect({socket, servername: target.hostname, ALPNProtocols: ['http/1.1']});
    https.get(target, {agent}, (r) => {
      const chunks = [];
      r.on('data', (c) => chunks.push(c));
      // stdout to a pipe is asynchronous in Node: exit only once the body is written.
      r.on('end', () => process.stdout.write(Buffer.concat(chunks), () => process.exit(0)));
    }).on('error', (e) => { console.error(e.message); process.exit(1); });
  }).on('error', (e) => { console.error(e.message); process.exit(1); }).end();
"""


def client_argv(client: str, url: str, tmp_path: Path) -> list[str]:
    if client == "curl":
        return ["curl", "-sS", "--fail", url]  # https_proxy and CURL_CA_BUNDLE from the environment
    if client == "node":
        script = tmp_path / "connect_client.js"
        script.write_text(NODE_CLIENT)
        return [shutil.which("node") or "node", str(script), url]
    return [sys.executable, "-c", PYTHON_CLIENTS[client], url]


CLIENTS = ["curl", "requests", "httpx", "aiohttp", "node"]


@pytest.mark.parametrize("client", CLIENTS)
def test_an_intercepted_https_call_gets_byte_exact_bodies_over_the_pool(
    setup: Setup, client: str, tmp_path: Path
) -> None:
    url = setup.url(INTERCEPTED, f"/bytes?n={SIZE}&seed={SEED}")
    body = run(setup, client_argv(client, url, tmp_path)).stdout
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(random_bytes(SIZE, SEED)).hexdigest()
    seen = setup.upstream.state.requests[-1]
    assert ("authorization", CREDENTIAL) in seen.headers  # the route's credential, added by the sidecar
    assert setup.upstream.peers == [None]  # the sidecar's own connection: the app's TLS ended at the sidecar
    line = setup.sidecar.wait_log(lambda e: e.get("event") == "access" and e.get("route") == "pay")
    assert line["intercepted"] is True and line["status"] == 200
    assert line["upstream"] == f"{INTERCEPTED}:{setup.upstream.state.port}"


def test_the_routes_credential_replaces_the_apps_and_other_names_get_none(setup: Setup, tmp_path: Path) -> None:
    code = ("import httpx, sys\n"
            "print(httpx.get(sys.argv[1], headers={'authorization': 'Bearer app-own'}, timeout=30).text)")
    echoed = json.loads(run(setup, [sys.executable, "-c", code, setup.url(INTERCEPTED, "/echo")]).stdout)
    assert [v for k, v in echoed["headers"] if k == "authorization"] == [CREDENTIAL]
    echoed = json.loads(run(setup, [sys.executable, "-c", code, setup.url(ALSO_INTERCEPTED, "/echo")]).stdout)
    assert [v for k, v in echoed["headers"] if k == "authorization"] == ["Bearer app-own"]
    assert dict(echoed["headers"])["host"] == f"{ALSO_INTERCEPTED}:{setup.upstream.state.port}"


def test_the_routes_retries_and_timeouts_apply_to_intercepted_requests_only_on_its_hosts(setup: Setup) -> None:
    code = ("import httpx, sys\n"
            "r = httpx.get(sys.argv[1], timeout=30)\n"
            "print(r.status_code, r.headers.get('x-egress-error'), r.text if r.status_code == 200 else '')")
    done = run(setup, [sys.executable, "-c", code, setup.url(INTERCEPTED, "/flaky?key=a&fail=2&mode=503")])
    status, _, body = done.stdout.decode().split(" ", 2)
    assert status == "200" and json.loads(body)["tries"] == 3  # two retries on 503, as the route says
    done = run(setup, [sys.executable, "-c", code, setup.url(ALSO_INTERCEPTED, "/flaky?key=b&fail=1&mode=503")])
    assert done.stdout.split()[0] == b"503"  # no route for this host: no retries
    done = run(setup, [sys.executable, "-c", code, setup.url(INTERCEPTED, "/delay?s=3")])
    assert done.stdout.split()[:2] == [b"504", b"read_timeout"]  # the route's 1s read timeout


def test_200_requests_over_20_app_connections_reach_the_upstream_over_at_most_the_pool(setup: Setup) -> None:
    code = (
        "import httpx, sys, threading\n"
        "url, results = sys.argv[1], []\n"
        "def app_connection():\n"
        "    with httpx.Client(timeout=30) as client:  # one keep-alive tunnel per client\n"
        "        results.extend(client.get(url).status_code for _ in range(10))\n"
        "threads = [threading.Thread(target=app_connection) for _ in range(20)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(len(results), sorted(set(results)))\n"
    )
    done = run(setup, [sys.executable, "-c", code, setup.url(INTERCEPTED, "/bytes?n=100")], timeout=120)
    assert done.stdout.split(maxsplit=1) == [b"200", b"[200]\n"]
    assert len(setup.upstream.state.requests) == 200
    # TLS connections the upstream served. (The tunnel core still dials the upstream before the
    # ClientHello decides interception: one TCP connect per tunnel, closed with no TLS and no byte.)
    assert 1 <= setup.upstream.state.connections <= POOL
    wait_until(lambda: len([e for e in setup.sidecar.logs()  # the access log is written in batches
                            if e.get("event") == "access" and e.get("intercepted")]) == 200, message="200 lines")
    series = f'egress_intercepted_requests_total{{route="pay",upstream="{INTERCEPTED}:{setup.upstream.state.port}"}}'
    metrics = httpx.get(f"{setup.sidecar.admin_url}/metrics", timeout=5).text
    assert f"{series} 200.0" in metrics
    tunnels = [e for e in setup.sidecar.logs() if e.get("event") == "tunnel"]
    assert len(tunnels) == 20 and {e.get("outcome") for e in tunnels} == {"intercepted"}


def test_a_name_not_intercepted_stays_the_apps_own_tls_session(setup: Setup, ca: trustme.CA, tmp_path: Path) -> None:
    client_cert = ca.issue_cert("app-client@example.test", common_name="app-client")
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    client_cert.cert_chain_pems[0].write_to_path(str(cert_path))
    client_cert.private_key_pem.write_to_path(str(key_path))
    code = ("import httpx, sys\n"
            "ctx = httpx.create_ssl_context()\n"
            "ctx.load_cert_chain(sys.argv[2], sys.argv[3])\n"
            "print(httpx.get(sys.argv[1], verify=ctx, timeout=30).text)")
    url = setup.url(TUNNELLED, "/echo")
    echoed = json.loads(run(setup, [sys.executable, "-c", code, url, str(cert_path), str(key_path)]).stdout)
    assert setup.upstream.peers == ["app-client"]  # the app's own TLS session reached the upstream
    assert "authorization" not in dict(echoed["headers"])
    assert not [e for e in setup.sidecar.logs() if e.get("event") == "access" and e.get("intercepted")]
    # The same client on an intercepted name: its certificate stops at the sidecar.
    run(setup, [sys.executable, "-c", code, setup.url(ALSO_INTERCEPTED, "/echo"), str(cert_path), str(key_path)])
    assert setup.upstream.peers == ["app-client", None]


def test_an_upstream_certificate_the_sidecar_does_not_trust_is_a_502_tls_error(
    setup: Setup, untrusted_upstream: Upstream
) -> None:
    code = ("import httpx, sys\n"
            "r = httpx.get(sys.argv[1], timeout=30)\n"
            "print(r.status_code, r.headers.get('x-egress-error'))")
    done = run(setup, [sys.executable, "-c", code, setup.url(UNTRUSTED, "/echo", untrusted_upstream.port)])
    assert done.stdout.split() == [b"502", b"tls_error"]
    assert untrusted_upstream.requests == []  # never sent anyway
    line = setup.sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "tls_error")
    assert line["intercepted"] is True


def test_an_app_that_does_not_trust_the_ca_fails_its_handshake_and_it_is_reported(setup: Setup) -> None:
    env = {k: v for k, v in setup.env.items() if k not in {e["name"] for e in trust_env(str(setup.ca_dir))}}
    code = ("import httpx, sys\n"
            "try:\n    httpx.get(sys.argv[1], timeout=30)\nexcept httpx.ConnectError as e:\n    print('refused', e)\n")
    done = subprocess.run([sys.executable, "-c", code, setup.url(INTERCEPTED, "/echo")], env=env,
                          capture_output=True, timeout=60, check=False)
    assert done.stdout.startswith(b"refused") and b"CERTIFICATE_VERIFY_FAILED" in done.stdout
    line = setup.sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "tls_error"
                                  and e.get("method") == "CONNECT")
    assert "interception handshake" in line["detail"]
    assert setup.upstream.state.requests == []


def test_sigterm_with_an_idle_intercepted_keep_alive_connection_exits_cleanly(setup: Setup) -> None:
    trust = ssl.create_default_context(cafile=str(setup.ca_dir / "bundle.pem"))
    with httpx.Client(proxy=setup.sidecar.url, verify=trust, trust_env=False, timeout=10) as app:
        assert app.get(setup.url(INTERCEPTED, "/bytes?n=10")).status_code == 200
        assert app.get(setup.url(INTERCEPTED, "/bytes?n=10")).status_code == 200  # the same tunnel, kept
        assert setup.sidecar.terminate(timeout=15) == 0
    assert len([e for e in setup.sidecar.logs() if e.get("event") == "tunnel"]) == 1


def test_a_connect_inside_an_intercepted_connection_is_refused_with_an_answer(setup: Setup) -> None:
    authority = f"{ALSO_INTERCEPTED}:{setup.upstream.state.port}"
    sock = socket.create_connection(("127.0.0.1", setup.sidecar.port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    trust = ssl.create_default_context(cafile=str(setup.ca_dir / "bundle.pem"))
    with trust.wrap_socket(sock, server_hostname=ALSO_INTERCEPTED) as tls:
        tls.sendall(f"CONNECT {TUNNELLED}:443 HTTP/1.1\r\nHost: {TUNNELLED}:443\r\n\r\n".encode())
        head = tls.recv(4096)
    # No nested tunnels: the intercepting protocol hands no CONNECT on, so it is a bad request,
    # answered over the app's TLS (which has no half-close) before the connection closes.
    assert head.startswith(b"HTTP/1.1 400") and b"x-egress-error: bad_request" in head
    assert setup.upstream.state.requests == []
