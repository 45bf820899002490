"""HTTPS apps through the sidecar: real clients with HTTPS_PROXY, an https:// TLS upstream.

Each client trusts only the test CA and reaches `https://localhost:<port>` through a CONNECT
tunnel: a 1 MiB binary body arrives byte-exact, and two requests reuse one tunnel (the
upstream sees one connection carrying both) where the client keeps connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Sidecar
from tests.upstream import Upstream, random_bytes, wait_until

SIZE = 1024 * 1024
SEED = 15
EXPECTED = random_bytes(SIZE, SEED)
NODE_AGENT = Path(__file__).with_name("connect_agent.js")


@pytest.fixture
def tunnel_sidecar(make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream) -> Sidecar:
    return make_sidecar(policy={"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [fresh_upstream.port]})


def url(upstream: Upstream, n: int = SIZE) -> str:
    return f"https://localhost:{upstream.port}/bytes?n={n}&seed={SEED}"


def proxy_env(sidecar: Sidecar, ca_file: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({"HTTPS_PROXY": sidecar.url, "https_proxy": sidecar.url, "NO_PROXY": "", "no_proxy": "",
                "SSL_CERT_FILE": ca_file, "REQUESTS_CA_BUNDLE": ca_file})
    return env


def tunnel_lines(sidecar: Sidecar, count: int) -> list[dict[str, object]]:
    def enough() -> list[dict[str, object]] | None:
        lines = [e for e in sidecar.logs() if e.get("event") == "tunnel"]
        return lines if len(lines) >= count else None

    return wait_until(enough, 10, message=f"{count} tunnel lines")  # type: ignore[no-any-return]


def assert_one_tunnel_two_requests(sidecar: Sidecar, upstream: Upstream) -> None:
    """Both requests reached the upstream on one connection, i.e. through one tunnel."""
    assert len(upstream.requests) == 2
    assert upstream.connections == 1
    assert {seen.connection for seen in upstream.requests} == {1}
    line = tunnel_lines(sidecar, 1)[0]
    assert line["upstream"] == f"localhost:{upstream.port}" and line["sni"] == "localhost"
    assert line["address"] == "127.0.0.1" and int(line["bytes_out"]) > 2 * SIZE  # type: ignore[call-overload]


def test_curl_with_https_proxy_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                 ca_file: str, tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    subprocess.run(["curl", "-sS", "--fail", "--cacert", ca_file, url(fresh_upstream), "-o", str(first),
                    url(fresh_upstream), "-o", str(second)],
                   env=proxy_env(tunnel_sidecar, ca_file), check=True, timeout=60)
    assert first.read_bytes() == EXPECTED and second.read_bytes() == EXPECTED
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)


def test_httpx_with_https_proxy_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                  ca_file: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(proxy=tunnel_sidecar.url, verify=context, trust_env=False) as client:
        bodies = [client.get(url(fresh_upstream)).content for _ in range(2)]
    assert bodies == [EXPECTED, EXPECTED]
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)


def test_python_requests_with_https_proxy_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                            ca_file: str) -> None:
    code = ("import hashlib, json, sys, requests\n"
            "with requests.Session() as s:\n"
            "    print(json.dumps([hashlib.sha256(s.get(sys.argv[1]).content).hexdigest() for _ in range(2)]))\n")
    done = subprocess.run([sys.executable, "-c", code, url(fresh_upstream)], env=proxy_env(tunnel_sidecar, ca_file),
                          capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(done.stdout) == [hashlib.sha256(EXPECTED).hexdigest()] * 2
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)


def test_urllib_with_https_proxy_gets_the_body_byte_exact(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                          ca_file: str) -> None:
    # urllib opens a connection per request (no keep-alive): one tunnel each.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": tunnel_sidecar.url}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)),
    )
    for _ in range(2):
        with opener.open(url(fresh_upstream), timeout=30) as response:
            assert response.read() == EXPECTED
    assert fresh_upstream.connections == 2
    assert len(tunnel_lines(tunnel_sidecar, 2)) == 2


def test_aiohttp_with_https_proxy_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                    ca_file: str) -> None:
    import aiohttp

    async def fetch() -> list[bytes]:
        context = ssl.create_default_context(cafile=ca_file)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1)) as session:
            bodies = []
            for _ in range(2):
                async with session.get(url(fresh_upstream), proxy=tunnel_sidecar.url) as response:
                    bodies.append(await response.read())
            return bodies

    assert asyncio.run(fetch()) == [EXPECTED, EXPECTED]
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)


def test_wget_with_https_proxy_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                 ca_file: str, tmp_path: Path) -> None:
    subprocess.run(["wget", "-q", "--ca-certificate", ca_file, "-P", str(tmp_path), url(fresh_upstream),
                    url(fresh_upstream, SIZE) + "&again=1"],
                   env=proxy_env(tunnel_sidecar, ca_file), check=True, timeout=60, cwd=tmp_path)
    files = sorted(tmp_path.glob("bytes*"))
    assert [f.read_bytes() for f in files] == [EXPECTED, EXPECTED]
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)


def test_node_with_a_connect_agent_reuses_one_tunnel(tunnel_sidecar: Sidecar, fresh_upstream: Upstream,
                                                     ca_file: str, tmp_path: Path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    done = subprocess.run(["node", str(NODE_AGENT), tunnel_sidecar.url, url(fresh_upstream), ca_file,
                           *map(str, outs)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"statuses": [200, 200]}
    assert [o.read_bytes() for o in outs] == [EXPECTED, EXPECTED]
    assert_one_tunnel_two_requests(tunnel_sidecar, fresh_upstream)
