"""Shared fixtures: a test CA, real TLS upstreams, and the real sidecar as a subprocess."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from tests.processes import stop_process
from tests.servers.nginx import NginxUpstream
from tests.servers.upstream import Upstream, UpstreamServer, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost", "127.0.0.1", "upstream.test"))).configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


@pytest.fixture(scope="session")
def upstream(ca: trustme.CA) -> Iterator[Upstream]:
    """A TLS upstream on 127.0.0.1 shared by a session (tests must not count its requests globally)."""
    server = UpstreamServer(server_context(ca))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture
def fresh_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    """A TLS upstream of the test's own, for tests that count connections or requests."""
    server = UpstreamServer(server_context(ca))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture
def nginx(ca: trustme.CA, tmp_path: Path) -> Iterator[Callable[..., NginxUpstream]]:
    """Real nginx TLS upstreams (HTTP/2 by ALPN), started on demand with NginxUpstream's options."""
    started: list[NginxUpstream] = []

    def make(**kwargs: Any) -> NginxUpstream:
        server = NginxUpstream(ca, tmp_path / f"nginx{len(started)}", **kwargs).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        """A client that uses the sidecar as its HTTP proxy (forward-proxy form)."""
        return httpx.Client(proxy=self.url, trust_env=False, **kwargs)

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return lines

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        return wait_until(lambda: next((e for e in self.logs() if predicate(e)), None), timeout,
                          message="log line")

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field} not found")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return int(self.proc.returncode)


def base_config(ca_file: str, **overrides: Any) -> dict[str, Any]:
    """A test config: ephemeral ports, trust for the test CA, loopback upstreams allowed."""
    config: dict[str, Any] = {
        # No transparent listener (the egress lock's): tests that want one give it a port.
        "listen": {"host": "127.0.0.1", "port": free_port(), "transparent_port": None},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "tls": {"ca_file": ca_file},
        # The tests' own upstreams live on 127.0.0.1, which the policy denies by default.
        "policy": {"allow_cidrs": ["127.0.0.0/8", "::1/128"]},
        "log": {"format": "json", "level": "info"},
        "drain": {"grace": "5s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def start_sidecar(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                  config_path: Path | None = None) -> Sidecar:
    """Start the sidecar on `config`; `config_path`: where the config already is (a kubelet-style
    volume, say) instead of a file written here."""
    if config_path is None:
        config_path = tmp_path / f"sidecar-{config['listen']['port']}.yaml"
        config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"sidecar-{config['listen']['port']}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    sidecar = Sidecar(proc, config["listen"]["port"], config["admin"]["port"], log_path, config_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{sidecar.admin_url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=15, message="sidecar ready")
    except BaseException:
        proc.kill()
        proc.wait(5)
        raise
    return sidecar


@pytest.fixture
def make_sidecar(tmp_path: Path, ca_file: str) -> Iterator[Callable[..., Sidecar]]:
    """Factory: `make_sidecar(routes=[...], pool={...})` starts a real sidecar; stopped at teardown."""
    started: list[Sidecar] = []

    def make(env: dict[str, str] | None = None, **overrides: Any) -> Sidecar:
        sidecar = start_sidecar(tmp_path, base_config(ca_file, **overrides), env)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        stop_process(sidecar.proc)


@pytest.fixture
def sidecar(make_sidecar: Callable[..., Sidecar], upstream: Upstream) -> Sidecar:
    """A sidecar with one route, `/up` -> the shared TLS upstream."""
    return make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}])


def monotonic_deadline(seconds: float) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    """The cyclic gc off for the test: whatever is still alive afterwards was only freeable by it."""
    gc.collect()  # start from a clean heap: earlier tests' garbage is not ours
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
