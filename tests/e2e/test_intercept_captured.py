"""Captured :443 (the egress lock) is intercepted like a CONNECT: the same hook, the same path.

In-process, without iptables: a bare listener stands in for the transparent listener and hands
each connection to the real `CapturedTLS` (sidecar/tunnel/captured_tls.py) with the original destination
the kernel would report; from there everything is the sidecar's: ClientHello and SNI checks, the
tunnel, the interception hook, TLS with the minted leaf, the forward path and the pool.
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
from sidecar.tunnel.captured_tls import CapturedTLS
from tests.conftest import base_config
from tests.servers.upstream import Upstream


def test_a_captured_tls_connection_to_an_intercepted_name_is_served_through_the_pool(
        ca_file: str, fresh_upstream: Upstream, tmp_path: Path) -> None:
    config = cfg.from_mapping(base_config(
        ca_file, intercept={"hosts": ["upstream.test"], "ca_dir": str(tmp_path / "ca")},
        resolve={"upstream.test": "127.0.0.1"},
        policy={"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [fresh_upstream.port]},
        routes=[{"name": "up", "match_hosts": ["upstream.test"], "headers": {"x-route": {"value": "yes"}}}]))
    runtime = build_runtime(config)
    assert runtime.interceptor is not None and runtime.tunnels is not None
    server = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), "127.0.0.1", config.listen.port, config,
                                              limits.observer_report(runtime.observer, "-"), tunnels=runtime.tunnels))
    refusals: list[tuple[str, str]] = []
    captured = CapturedTLS(runtime.tunnels, runtime.policy, 5.0,
                           lambda kind, original, detail, reason: refusals.append((kind, detail)))
    app_trust = ssl.create_default_context(cadata=runtime.interceptor.ca.certificate_pem.decode())

    class Redirected(asyncio.Protocol):
        """What the transparent listener does with a connection whose first bytes are TLS."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            captured.take(self.transport, ("127.0.0.1", fresh_upstream.port), data)  # type: ignore[arg-type]

    async def main() -> bytes:
        serving = asyncio.create_task(server.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert loop.time() < deadline and not serving.done(), "the data listener did not start"
            await asyncio.sleep(0.01)
        assert runtime.interceptor is not None and runtime.tunnels is not None
        runtime.interceptor.attach(runtime.tunnels, _intercepting_protocol(server), 5.0,
                                   limits.observer_report(runtime.observer, "-"))
        redirect = await loop.create_server(Redirected, "127.0.0.1", 0)
        port = redirect.sockets[0].getsockname()[1]
        # The app dials upstream.test:443 directly; the lock sends it to the sidecar.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=app_trust,
                                                       server_hostname="upstream.test")
        writer.write(b"GET /echo HTTP/1.1\r\nhost: upstream.test\r\nconnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        redirect.close()
        server.should_exit = True
        await serving
        await runtime.upstream.aclose()
        return answer

    answer = uvloop.run(main())
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert refusals == []
    (seen,) = fresh_upstream.requests
    assert ("x-route", "yes") in seen.headers  # the host's route applied: not a plain tunnel
    metrics = runtime.observer.metrics
    assert metrics is not None and sum(s.intercepted for s in metrics._series.values()) == 1
