"""The tunnel API other listeners build on, in-process (sidecar/tunnel/tunnels.py's module doc).

The real data listener (uvicorn on uvloop with the sidecar's protocol and runtime) or a bare
asyncio listener standing in for the transparent one, real sockets, a recording upstream:
- `Tunnels.intercept`: called once the SNI is checked, before any byte goes upstream; a hook
  that takes the client gets it, and the upstream gets nothing;
- `Tunnels.open`: first bytes already read and an address to dial (as SO_ORIGINAL_DST gives
  it), still checked by the address rules;
- finished tunnels leave nothing for the cyclic garbage collector (gc is frozen in production).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from sidecar import config as cfg
from sidecar.ingress import protocol as limits
from sidecar.proxy.app import ForwardApp
from sidecar.runtime import Runtime, build_runtime
from sidecar.server import SignalFreeServer, _uvicorn_config
from sidecar.tunnel.splice import Tunnel, TunnelRecord, _UpstreamSide
from tests.conftest import base_config
from tests.e2e.connect_support import TcpUpstream, client_hello
from tests.servers.upstream import wait_until


def runtime_for(ca_file: str, upstream: TcpUpstream, **policy: Any) -> Runtime:
    raw = base_config(ca_file)
    raw["policy"] = {**raw["policy"], "connect_ports": [upstream.port], **policy}
    return build_runtime(cfg.from_mapping(raw))


def serve_data_listener(runtime: Runtime, body: Callable[[int], Awaitable[Any]]) -> Any:
    """Run `body(port)` against the real data listener, in-process, on uvloop."""
    config = runtime.config
    server = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), "127.0.0.1", config.listen.port, config,
                                              limits.observer_report(runtime.observer, "-"), "httptools",
                                              runtime.tunnels))

    async def main() -> Any:
        serving = asyncio.create_task(server.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert loop.time() < deadline and not serving.done(), "the data listener did not start"
            await asyncio.sleep(0.01)
        try:
            return await body(config.listen.port)
        finally:
            server.should_exit = True
            await serving
            await runtime.upstream.aclose()

    return uvloop.run(main())


async def connect(port: int, authority: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return reader, writer


class _Terminator(asyncio.Protocol):
    """Stands in for interception's TLS terminator: answers with what it was handed."""

    def __init__(self, transport: asyncio.Transport, hello: bytes) -> None:
        self.transport = transport
        transport.write(b"terminated %d" % len(hello))
        transport.close()


def test_intercept_hook_gets_the_client_after_the_sni_check_and_the_upstream_nothing(ca_file: str) -> None:
    upstream = TcpUpstream("record")
    runtime = runtime_for(ca_file, upstream)
    seen: list[tuple[str | None, str, int, str | None]] = []

    def hook(record: TunnelRecord, client: asyncio.Transport, hello: bytes) -> bool:
        seen.append((record.sni, record.host, record.port, record.address))
        if record.sni != "localhost":
            return False  # not intercepted: the tunnel splices as usual
        client.set_protocol(_Terminator(client, hello))
        return True

    assert runtime.tunnels is not None
    runtime.tunnels.intercept = hook
    hello = client_hello("localhost")
    plain_hello = client_hello(None)

    async def body(port: int) -> tuple[bytes, bytes]:
        reader, writer = await connect(port, f"localhost:{upstream.port}")
        writer.write(hello)
        intercepted = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        # An IP literal without SNI: the hook says no, bytes reach the upstream.
        reader, writer = await connect(port, f"127.0.0.1:{upstream.port}")
        writer.write(plain_hello)
        writer.write_eof()
        spliced = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return intercepted, spliced

    try:
        intercepted, spliced = serve_data_listener(runtime, body)
        assert intercepted == b"terminated %d" % len(hello)
        assert spliced == b"got %d" % len(plain_hello)
        assert seen == [("localhost", "localhost", upstream.port, "127.0.0.1"),
                        (None, "127.0.0.1", upstream.port, "127.0.0.1")]
        wait_until(lambda: len(upstream.conns) == 2 and upstream.conns[0].closed, 5, message="upstream closed")
        assert bytes(upstream.conns[0].received) == b""  # the intercepted tunnel sent nothing upstream
        assert bytes(upstream.conns[1].received) == plain_hello
    finally:
        upstream.stop()


def test_open_takes_first_bytes_and_a_destination_address_like_a_transparent_listener(ca_file: str) -> None:
    upstream = TcpUpstream("record")
    allowed = runtime_for(ca_file, upstream)
    denied = runtime_for(ca_file, upstream, allow_cidrs=[])  # 127.0.0.1 is a loopback address: denied
    hello = client_hello("localhost")

    class Captured(asyncio.Protocol):
        """A listener that reads the first bytes itself, then hands the connection over."""

        def __init__(self, runtime: Runtime, results: list[bool]) -> None:
            self.runtime, self.results = runtime, results

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

        def data_received(self, data: bytes) -> None:
            tunnels = self.runtime.tunnels
            assert tunnels is not None
            self.results.append(tunnels.open(self.transport, "localhost", upstream.port, data,
                                             addresses=["127.0.0.1"]))

    async def through(runtime: Runtime) -> tuple[bytes, list[bool]]:
        results: list[bool] = []
        server = await asyncio.get_running_loop().create_server(lambda: Captured(runtime, results), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(hello)
        await asyncio.sleep(0)
        writer.write(b"more")
        writer.write_eof()
        try:
            answer = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            answer = b"reset"
        writer.close()
        server.close()
        return answer, results

    try:
        answer, results = uvloop.run(through(allowed))
        assert results == [True]
        assert answer == b"got %d" % (len(hello) + 4)
        assert upstream.received == hello + b"more"
        answer, results = uvloop.run(through(denied))
        assert results == [True]  # accepted for checking; the address check refuses it before dialling
        assert answer in (b"", b"reset")
        assert len(upstream.conns) == 1  # no second connection reached the upstream
    finally:
        upstream.stop()


def test_finished_tunnels_leave_no_cyclic_garbage(no_cyclic_gc: None, ca_file: str) -> None:
    upstream = TcpUpstream("echo")
    runtime = runtime_for(ca_file, upstream)
    kinds = (Tunnel, _UpstreamSide, TunnelRecord)

    def alive() -> int:
        return sum(1 for obj in gc.get_objects() if isinstance(obj, kinds))

    async def body(port: int) -> tuple[int, int]:
        before = alive()
        for index in range(20):
            reader, writer = await connect(port, f"localhost:{upstream.port}")
            writer.write(client_hello("localhost") + b"x" * 1000)
            await asyncio.wait_for(reader.readexactly(1000), 10)
            if index % 2:
                writer.write_eof()  # half-close: the upstream echoes, then closes
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
        assert runtime.tunnels is not None
        deadline = asyncio.get_running_loop().time() + 5
        while runtime.tunnels.active:
            assert asyncio.get_running_loop().time() < deadline, "tunnels still open"
            await asyncio.sleep(0.01)
        for _ in range(20):  # let the closed transports' callbacks run: turns, not time
            await asyncio.sleep(0)
        return before, alive()

    try:
        before, after = serve_data_listener(runtime, body)
        assert after == before, f"{after - before} tunnel objects alive without the gc"
    finally:
        upstream.stop()


def test_a_failing_intercept_hook_ends_its_tunnel_only(ca_file: str) -> None:
    upstream = TcpUpstream("record")
    runtime = runtime_for(ca_file, upstream)
    outcomes: list[str] = []
    finished = runtime.observer.tunnel_finished

    def record_outcome(record: TunnelRecord) -> None:
        outcomes.append(record.outcome)
        finished(record)

    runtime.observer.tunnel_finished = record_outcome  # type: ignore[method-assign]
    calls = []

    def hook(record: TunnelRecord, client: asyncio.Transport, hello: bytes) -> bool:
        calls.append(record.sni)
        if len(calls) == 1:
            raise RuntimeError("terminator not ready")
        return False

    assert runtime.tunnels is not None
    runtime.tunnels.intercept = hook
    hello = client_hello("localhost")

    async def body(port: int) -> tuple[bytes, bytes]:
        answers = []
        for _ in range(2):
            reader, writer = await connect(port, f"localhost:{upstream.port}")
            writer.write(hello)
            writer.write_eof()
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        return answers[0], answers[1]

    try:
        failed, spliced = serve_data_listener(runtime, body)
        assert failed == b"" and spliced == b"got %d" % len(hello)
        assert outcomes == ["intercept_error", "closed"]
        wait_until(lambda: len(upstream.conns) == 2 and upstream.conns[0].closed, 5, message="upstream closed")
        assert bytes(upstream.conns[0].received) == b""
    finally:
        upstream.stop()
