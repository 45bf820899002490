"""A finished request leaves nothing for the cyclic garbage collector.

The sidecar runs with the collector tuned down (server._tune_gc): the data path must free
each request's objects by reference counting alone. A request that ends in a reference cycle
costs a collection later (it did: a scope entry naming the request's cycle made each request
~6 objects of cyclic garbage, ~5 us a request in gc at c256). This drives the real data
listener in-process (uvicorn on uvloop with the sidecar's protocol, the real runtime, real
sockets and a real TLS upstream), with the collector off, and counts what is still alive.
"""

from __future__ import annotations

import asyncio
import gc

import httpx
import uvloop

from sidecar import config as cfg
from sidecar.ingress import protocol as limits
from sidecar.ingress.writer import ProxyCycle
from sidecar.observe.observer import Exchange
from sidecar.proxy.app import DisconnectWatch, ForwardApp, RequestBody
from sidecar.runtime import build_runtime
from sidecar.server import SignalFreeServer, _uvicorn_config
from sidecar.upstream.transport.transport import ResponseStream
from tests.conftest import base_config
from tests.servers.upstream import Upstream

REQUESTS = 60
# The sidecar's per-request objects (the test's client is raw sockets: it makes none of these).
PER_REQUEST = (ProxyCycle, Exchange, DisconnectWatch, RequestBody, ResponseStream, httpx.Request, httpx.Response)


def alive() -> dict[str, int]:
    """Live objects of each per-request kind (the client's own httpx objects included)."""
    counts = {kind.__name__: 0 for kind in PER_REQUEST}
    for obj in gc.get_objects():
        for kind in PER_REQUEST:
            if isinstance(obj, kind):
                counts[kind.__name__] += 1
    return counts


def test_requests_through_the_data_listener_leave_no_cyclic_garbage(
        no_cyclic_gc: None, ca_file: str, fresh_upstream: Upstream) -> None:
    config = cfg.from_mapping(base_config(ca_file, routes=[
        {"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}]))
    runtime = build_runtime(config)
    server = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), "127.0.0.1", config.listen.port, config,
                                              limits.observer_report(runtime.observer, "-")))

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        serving = asyncio.create_task(server.serve())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not server.started:
            assert loop.time() < deadline and not serving.done(), "the data listener did not start"
            await asyncio.sleep(0.01)
        before = alive()
        reader, writer = await asyncio.open_connection("127.0.0.1", config.listen.port)
        host = f"host: 127.0.0.1:{config.listen.port}".encode()
        for index in range(REQUESTS):  # one keep-alive connection, as an app's client would
            if index % 3 == 2:  # a request with a body (RequestBody, the receive() path)
                writer.write(b"POST /up/echo HTTP/1.1\r\n" + host + b"\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000)
            else:
                writer.write(b"GET /up/bytes?n=100 HTTP/1.1\r\n" + host + b"\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
        writer.close()
        await writer.wait_closed()
        for _ in range(20):  # let the closed connections' callbacks run: turns, not time
            await asyncio.sleep(0)
        after = alive()
        server.should_exit = True
        await serving
        await runtime.upstream.aclose()
        return before, after

    before, after = uvloop.run(main())
    assert after == before, f"objects of finished requests still alive without the gc: {after} (before {before})"
