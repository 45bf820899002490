"""Tunnels under faults: resets either side, a gigabyte, the cap, SIGTERM with tunnels open.

Everything a tunnel holds (two sockets, buffers, its slot, the drain's count) must come back:
the sidecar's descriptors return to their base, `egress_tunnels_active` to 0, and its RSS
stays flat while a gigabyte goes through one tunnel to a slow reader.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar
from tests.e2e.connect_support import TcpUpstream, client_hello, connect, open_fds, read_to_eof, reset
from tests.e2e.test_connect_policy import metric, tunnel_config, tunnel_line
from tests.servers.upstream import wait_until


@pytest.fixture
def upstreams() -> Iterator[Callable[..., TcpUpstream]]:
    made: list[TcpUpstream] = []

    def make(mode: str, size: int = 0) -> TcpUpstream:
        made.append(TcpUpstream(mode, size))
        return made[-1]

    yield make
    for upstream in made:
        upstream.stop()


def base_fds(sidecar: Sidecar) -> int:
    # One request through the pooled path first would open pool sockets; tunnels use none.
    return open_fds(sidecar.proc.pid)


def settle(sidecar: Sidecar, base: int) -> None:
    wait_until(lambda: open_fds(sidecar.proc.pid) <= base, 5, message=f"descriptors back to {base}")
    wait_until(lambda: metric(sidecar, "egress_tunnels_active") == 0, 5, message="no tunnel open")


def test_upstream_reset_mid_tunnel_frees_everything(make_sidecar: Callable[..., Sidecar],
                                                    upstreams: Callable[..., TcpUpstream]) -> None:
    upstream = upstreams("reset", 200_000)
    sidecar = make_sidecar(**tunnel_config(upstream.port))
    base = base_fds(sidecar)
    for _ in range(5):
        sock, status, _, _ = connect(sidecar.port, f"localhost:{upstream.port}")
        assert status == 200
        sock.sendall(client_hello("localhost"))
        got = read_to_eof(sock, limit=1 << 30)
        assert len(got) <= 200_000  # the part sent before the reset, then the end
        sock.close()
    settle(sidecar, base)
    assert metric(sidecar, "egress_tunnels_total", outcome="upstream_reset") >= 1
    # The tunnel line is written as the tunnel ends, which may trail the descriptors' release.
    wait_until(lambda: len([e for e in sidecar.logs() if e.get("event") == "tunnel"]) >= 5, 5,
               message="one tunnel line per tunnel")
    lines = [e for e in sidecar.logs() if e.get("event") == "tunnel"]
    assert len(lines) == 5


def test_client_abort_mid_tunnel_frees_everything(make_sidecar: Callable[..., Sidecar],
                                                  upstreams: Callable[..., TcpUpstream]) -> None:
    upstream = upstreams("source", 64 << 20)  # more than any buffer: the upstream is mid-send
    sidecar = make_sidecar(**tunnel_config(upstream.port))
    base = base_fds(sidecar)
    for _ in range(5):
        sock, status, _, _ = connect(sidecar.port, f"localhost:{upstream.port}")
        assert status == 200
        sock.sendall(client_hello("localhost"))
        assert sock.recv(65536)  # bytes are flowing down
        reset(sock)
    settle(sidecar, base)
    # Each upstream connection was closed by the sidecar, not left sending into the void.
    wait_until(lambda: len(upstream.conns) == 5 and all(c.closed for c in upstream.conns), 10,
               message="upstream connections closed")
    assert metric(sidecar, "egress_tunnels_total", outcome="client_reset") + metric(
        sidecar, "egress_tunnels_total", outcome="client_closed") == 5


def test_a_gigabyte_to_a_slow_reader_keeps_rss_flat(make_sidecar: Callable[..., Sidecar],
                                                    upstreams: Callable[..., TcpUpstream]) -> None:
    size = 1 << 30
    upstream = upstreams("source", size)
    sidecar = make_sidecar(**tunnel_config(upstream.port), log={"access": True})
    sock, status, _, _ = connect(sidecar.port, f"localhost:{upstream.port}", timeout=60)
    assert status == 200
    sock.sendall(client_hello("localhost"))
    rss_before = sidecar.rss_kib()
    peak = rss_before
    received = 0
    started = time.monotonic()
    first_pause_done = False
    while received < size:
        assert time.monotonic() - started < 120, f"only {received} bytes in 120 s"
        chunk = sock.recv(1 << 20)
        assert chunk, f"tunnel closed after {received} bytes"
        received += len(chunk)
        if not first_pause_done and received > 64 << 20:
            # A reader that stops: the upstream keeps pushing, the sidecar must stop reading it.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                peak = max(peak, sidecar.rss_kib())
                time.sleep(0.05)
            first_pause_done = True
        if received % (64 << 20) < len(chunk):
            peak = max(peak, sidecar.rss_kib())
    assert received == size
    sock.close()
    line = tunnel_line(sidecar)
    assert line["bytes_out"] == size
    peak = max(peak, sidecar.rss_kib("VmHWM"))
    assert peak - rss_before < 16 * 1024, f"RSS grew by {(peak - rss_before) / 1024:.1f} MiB"


def test_max_tunnels_holds_under_a_burst(make_sidecar: Callable[..., Sidecar],
                                         upstreams: Callable[..., TcpUpstream]) -> None:
    upstream = upstreams("record")
    sidecar = make_sidecar(**tunnel_config(upstream.port), limits={"max_tunnels": 5})
    answers = [connect(sidecar.port, f"localhost:{upstream.port}") for _ in range(12)]
    statuses = sorted(status for _, status, _, _ in answers)
    assert statuses == [200] * 5 + [503] * 7
    assert len(upstream.conns) == 5
    for sock, *_ in answers:
        sock.close()
    wait_until(lambda: metric(sidecar, "egress_tunnels_active") == 0, 5, message="all closed")


def _drain_config(port: int, grace: str) -> dict[str, Any]:
    return {**tunnel_config(port), "drain": {"grace": grace}}


def test_sigterm_keeps_open_tunnels_flowing_until_grace_then_closes_them(
    make_sidecar: Callable[..., Sidecar], upstreams: Callable[..., TcpUpstream]
) -> None:
    upstream = upstreams("echo")
    sidecar = make_sidecar(**_drain_config(upstream.port, "2s"))
    sock, status, _, _ = connect(sidecar.port, f"localhost:{upstream.port}")
    assert status == 200
    hello = client_hello("localhost")
    sock.sendall(hello)
    assert len(read_exact(sock, len(hello))) == len(hello)
    signalled = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{sidecar.admin_url}/readyz", timeout=2).status_code == 503, 5,
               message="not ready while draining")
    # Still flowing during the grace period.
    sock.sendall(b"still there?")
    assert read_exact(sock, 12) == b"still there?"
    # Closed when the grace ends; the process exits 0.
    assert read_to_eof(sock) == b""
    assert time.monotonic() - signalled >= 1.8
    assert sidecar.proc.wait(10) == 0
    assert [e["outcome"] for e in sidecar.logs() if e.get("event") == "tunnel"] == ["drained"]


def test_sigterm_exits_as_soon_as_the_last_tunnel_ends(make_sidecar: Callable[..., Sidecar],
                                                       upstreams: Callable[..., TcpUpstream]) -> None:
    upstream = upstreams("record")
    sidecar = make_sidecar(**_drain_config(upstream.port, "30s"))
    sock, status, _, _ = connect(sidecar.port, f"localhost:{upstream.port}")
    assert status == 200
    sock.sendall(client_hello("localhost"))
    sidecar.proc.send_signal(signal.SIGTERM)
    time_signalled = time.monotonic()
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock).startswith(b"got ")
    assert sidecar.proc.wait(10) == 0
    assert time.monotonic() - time_signalled < 10
    assert [e["outcome"] for e in sidecar.logs() if e.get("event") == "tunnel"] == ["closed"]


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data
