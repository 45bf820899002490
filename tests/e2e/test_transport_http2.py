"""Our HTTP/2 transport against real nginx: bytes, GOAWAY roll-overs, stream limits, ALPN fallback."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import trustme

from tests.conftest import Sidecar
from tests.prometheus import samples, scrape, total
from tests.servers.nginx import Logged, NginxUpstream
from tests.servers.upstream import wait_until


def h2_route(server: NginxUpstream, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "h2", "prefix": "/h2", "upstream": f"https://localhost:{server.port}", "http2": True, **extra}]


def logged(server: NginxUpstream, count: int) -> list[Logged]:
    """nginx's access log once it holds `count` lines (it writes each after its response)."""
    entries: list[Logged] = wait_until(lambda: found if len(found := server.logged()) >= count else None,
                                       timeout=10, message=f"{count} access log lines")
    return entries


def test_one_mib_bodies_pass_byte_exact_both_ways(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx()
    sidecar = make_sidecar(routes=h2_route(server))
    upload = os.urandom(1024 * 1024)
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=30) as client:
        down = client.get("/h2/1m")
        up = client.post("/h2/post", content=upload)
    assert down.status_code == 200
    assert down.content == (server.dir / "www" / "1m").read_bytes()
    assert (up.status_code, up.text) == (200, "stored\n")
    [posted] = [entry for entry in logged(server, 2) if entry.method == "POST"]
    assert posted.protocol == "HTTP/2.0"
    assert Path(posted.body_file).read_bytes() == upload


def test_goaway_every_five_requests_loses_no_request_and_sends_each_post_once(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    # nginx ends each connection with GOAWAY after 5 streams; with 16 in flight, most streams
    # of each connection are above its last stream id. No retries on the route: the transport
    # alone sends those again, POSTs included, since the server never saw them.
    server = nginx(keepalive_requests=5)
    sidecar = make_sidecar(routes=h2_route(server))
    bodies = {index: f"{index:05d}".encode() * (16 * 1024 // 5 + 1) for index in range(0, 200, 2)}

    def call(index: int) -> tuple[int, str]:
        with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=30) as client:
            if index in bodies:
                response = client.post("/h2/post", content=bodies[index])
            else:
                response = client.get("/h2/hello")
        return response.status_code, response.text

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(200)))
    assert results.count((200, "stored\n")) == 100
    assert results.count((200, "hello HTTP/2.0\n")) == 100
    entries = logged(server, 200)
    assert len({entry.connection for entry in entries}) >= 40  # GOAWAY really ended connections
    received = [hashlib.sha256(Path(entry.body_file).read_bytes()).hexdigest()
                for entry in entries if entry.method == "POST"]
    assert sorted(received) == sorted(hashlib.sha256(body).hexdigest() for body in bodies.values())
    found = samples(scrape(sidecar.admin_url))
    assert total(found, "egress_retries_total", route="h2", reason="goaway") > 0
    assert total(found, "egress_errors_total") == 0


def test_stream_limit_four_under_concurrency_32_opens_only_the_connections_needed(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx(max_concurrent_streams=4)
    sidecar = make_sidecar(routes=h2_route(server))

    def call(index: int) -> int:
        with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=30) as client:
            path = "/h2/slow" if index < 32 else "/h2/hello"  # the first 32 overlap for ~1 s
            return client.get(path).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(160)))
    assert statuses == [200] * 160
    connections = {entry.connection for entry in logged(server, 160)}
    assert 2 <= len(connections) <= 32 // 4


def test_app_leaving_mid_download_frees_its_stream_not_the_connection(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    # One stream per connection: if the abandoned stream were not reset and forgotten, the next
    # request would need a second connection (or wait for the slow response to end).
    server = nginx(max_concurrent_streams=1)
    sidecar = make_sidecar(routes=h2_route(server))
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=30) as client:
        with client.stream("GET", "/h2/1m-slow") as response:
            assert response.status_code == 200
            next(response.iter_raw())  # a first chunk, then the app goes away
        after = [client.get("/h2/hello") for _ in range(3)]
    assert [(r.status_code, r.text) for r in after] == [(200, "hello HTTP/2.0\n")] * 3
    assert len({entry.connection for entry in logged(server, 4)}) == 1
    found = samples(scrape(sidecar.admin_url))
    assert total(found, "egress_upstream_connections_opened_total") == 1
    assert total(found, "egress_upstream_abandoned_total", outcome="kept") == 1


def test_upstream_offering_only_http11_is_served_over_http11_and_said_once(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    server = nginx(alpn_http2=False)
    sidecar = make_sidecar(routes=h2_route(server))
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=30) as client:
        responses = [client.get("/h2/hello") for _ in range(3)]
    assert [(r.status_code, r.text) for r in responses] == [(200, "hello HTTP/1.1\n")] * 3
    sidecar.wait_log(lambda e: "offers no HTTP/2" in str(e.get("event")))
    notes = [e for e in sidecar.logs() if "offers no HTTP/2" in str(e.get("event"))]
    assert [e["level"] for e in notes] == ["warning"]


def test_http2_connections_dial_only_what_the_policy_allows(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    # svc.test resolves (static `resolve`) to loopback, which this policy denies: the connect
    # guard refuses the address before any connection is made.
    server = nginx()
    sidecar = make_sidecar(
        policy={"allow_cidrs": []},
        resolve={"svc.test": "127.0.0.1"},
        routes=[{"name": "h2", "prefix": "/h2", "upstream": f"https://svc.test:{server.port}", "http2": True}],
    )
    response = httpx.get(f"{sidecar.url}/h2/hello", trust_env=False, timeout=15)
    assert (response.status_code, response.headers["x-egress-error"]) == (403, "denied_ip")
    found = samples(scrape(sidecar.admin_url))
    assert total(found, "egress_upstream_connections_opened_total") == 0
    assert server.logged() == []


def test_http2_requests_leave_no_cyclic_garbage(no_cyclic_gc: None, ca_file: str, ca: trustme.CA,
                                                tmp_path: Path) -> None:
    # As tests/e2e/test_request_memory.py, through an HTTP/2 route (GETs, POSTs, a reset stream).
    import asyncio

    import uvloop

    from sidecar import config as cfg
    from sidecar.ingress import protocol as limits
    from sidecar.proxy.app import ForwardApp
    from sidecar.runtime import build_runtime
    from sidecar.server import SignalFreeServer, _uvicorn_config
    from sidecar.upstream.transport.h2_connection import Stream
    from sidecar.upstream.transport.h2_transport import H2ResponseStream
    from tests.conftest import base_config

    server = NginxUpstream(ca, tmp_path / "nginx").start()
    try:
        config = cfg.from_mapping(base_config(ca_file, routes=h2_route(server)))
        runtime = build_runtime(config)
        listener = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), "127.0.0.1", config.listen.port, config,
                                                    limits.observer_report(runtime.observer, "-")))
        kinds = (Stream, H2ResponseStream, httpx.Request, httpx.Response)

        def alive() -> dict[str, int]:
            import gc
            return {kind.__name__: sum(1 for obj in gc.get_objects() if isinstance(obj, kind)) for kind in kinds}

        async def main() -> tuple[dict[str, int], dict[str, int]]:
            serving = asyncio.create_task(listener.serve())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not listener.started:
                assert loop.time() < deadline and not serving.done(), "the data listener did not start"
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", config.listen.port)
            host = f"host: 127.0.0.1:{config.listen.port}".encode()

            async def call(request: bytes) -> bytes:
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                return head

            await call(b"GET /h2/hello HTTP/1.1\r\n" + host + b"\r\n\r\n")  # the connection is up
            before = alive()
            for index in range(30):
                if index % 3 == 2:
                    head = await call(b"POST /h2/post HTTP/1.1\r\n" + host + b"\r\ncontent-length: 5000\r\n\r\n"
                                      + b"x" * 5000)
                elif index % 5 == 4:
                    head = await call(b"GET /h2/rst HTTP/1.1\r\n" + host + b"\r\n\r\n")  # 502 upstream_reset
                else:
                    head = await call(b"GET /h2/hello HTTP/1.1\r\n" + host + b"\r\n\r\n")
                assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 502 ")), head
            writer.close()
            await writer.wait_closed()
            for _ in range(20):
                await asyncio.sleep(0)
            after = alive()
            listener.should_exit = True
            await serving
            await runtime.upstream.aclose()
            return before, after

        before, after = uvloop.run(main())
    finally:
        server.stop()
    assert after == before, f"objects of finished requests still alive without the gc: {after} (before {before})"


def test_refused_streams_with_bodies_past_the_replay_limit_fail_cleanly_before_any_response(
    make_sidecar: Callable[..., Sidecar], nginx: Callable[..., NginxUpstream]
) -> None:
    # One stream per connection (keepalive_requests 1): concurrent streamed uploads are refused by
    # GOAWAY. One whose body is past `max_body_bytes` once refused cannot be sent again: the app
    # gets 502 upstream_reset (never a truncated or doubled upload); the others are replayed.
    server = nginx(keepalive_requests=1)
    sidecar = make_sidecar(routes=h2_route(server, retries={"max_body_bytes": 1024}))
    body = os.urandom(256 * 1024)

    def call(_: int) -> tuple[int, str | None]:
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 16384):
                yield body[start:start + 16384]

        response = httpx.post(f"{sidecar.url}/h2/post", content=chunks(), trust_env=False, timeout=30)
        return response.status_code, response.headers.get("x-egress-error")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(16)))
    assert set(outcomes) <= {(200, None), (502, "upstream_reset")}, outcomes
    stored = [Path(e.body_file).read_bytes() for e in logged(server, outcomes.count((200, None)))
              if e.method == "POST" and e.status == 200]
    assert stored == [body] * outcomes.count((200, None))  # each success stored once, whole
