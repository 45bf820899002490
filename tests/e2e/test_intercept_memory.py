"""Intercepted requests leave nothing for the cyclic garbage collector either.

As tests/e2e/test_request_memory.py, with the data listener in-process and the collector off,
but the requests go through a CONNECT tunnel the sidecar intercepts: the app's TLS is terminated
on the tunnel's transport and a second listener protocol serves it (sidecar/intercept/terminate.py).
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import uvloop

from sidecar import config as cfg
from sidecar.ingress import protocol as limits
from sidecar.proxy.app import ForwardApp
from sidecar.runtime import build_runtime
from sidecar.server import SignalFreeServer, _intercepting_protocol, _uvicorn_config
from tests.conftest import base_config
from tests.e2e.test_request_memory import REQUESTS, alive
from tests.servers.upstream import Upstream


def test_intercepted_requests_leave_no_cyclic_garbage(
        no_cyclic_gc: None, ca_file: str, fresh_upstream: Upstream, tmp_path: Path) -> None:
    config = cfg.from_mapping(base_config(
        ca_file, intercept={"hosts": ["upstream.test"], "ca_dir": str(tmp_path / "ca")},
        resolve={"upstream.test": "127.0.0.1"},
        policy={"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [fresh_upstream.port]}))
    runtime = build_runtime(config)
    assert runtime.interceptor is not None and runtime.tunnels is not None
    server = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), "127.0.0.1", config.listen.port, config,
                                              limits.observer_report(runtime.observer, "-"), tunnels=runtime.tunnels))
    app_trust = ssl.create_default_context(cadata=runtime.interceptor.ca.certificate_pem.decode())

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        serving = asyncio.create_task(server.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert loop.time() < deadline and not serving.done(), "the data listener did not start"
            await asyncio.sleep(0.01)
        assert runtime.interceptor is not None and runtime.tunnels is not None
        runtime.interceptor.attach(runtime.tunnels, _intercepting_protocol(server), 5.0,
                                   limits.observer_report(runtime.observer, "-"))
        before = alive()
        reader, writer = await asyncio.open_connection("127.0.0.1", config.listen.port)
        authority = f"upstream.test:{fresh_upstream.port}".encode()
        writer.write(b"CONNECT " + authority + b" HTTP/1.1\r\nhost: " + authority + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        await writer.start_tls(app_trust, server_hostname="upstream.test")
        for index in range(REQUESTS):  # one keep-alive connection inside the tunnel
            if index % 3 == 2:
                writer.write(b"POST /echo HTTP/1.1\r\nhost: upstream.test\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000)
            else:
                writer.write(b"GET /bytes?n=100 HTTP/1.1\r\nhost: upstream.test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass  # the TLS close_notify exchange may be cut short; the connection is gone either way
        for _ in range(20):  # let the closed connections' callbacks run: turns, not time
            await asyncio.sleep(0)
        after = alive()
        server.should_exit = True
        await serving
        await runtime.upstream.aclose()
        return before, after

    before, after = uvloop.run(main())
    # They went through the sidecar's forward path, not a plain tunnel: counted as intercepted.
    metrics = runtime.observer.metrics
    assert metrics is not None and sum(s.intercepted for s in metrics._series.values()) == REQUESTS
    assert len(fresh_upstream.requests) == REQUESTS
    assert after == before, f"objects of finished intercepted requests still alive without the gc: {after} ({before})"
