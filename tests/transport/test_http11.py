"""HTTP11Transport against a real TLS upstream: reuse, byte-exact bodies, exact heads, framing."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sidecar.upstream.transport import HTTP11Transport
from tests.servers.loop_upstream import GZIP_BODY, Certs, Upstream, rss_bytes, run, seeded_bytes
from tests.transport.helpers import certs, fetch, make_request, plain_server, server, transport_for

__all__ = ["certs", "plain_server", "server"]  # fixtures used by name below


def test_sequential_requests_reuse_one_tls_connection(certs: Certs, server: Upstream) -> None:
    async def main() -> list[bool]:
        transport = transport_for(certs)
        reused = []
        for _ in range(20):
            response, body = await fetch(transport, make_request("GET", server.url("/bytes/100")))
            assert body == seeded_bytes(100)
            reused.append(response.extensions["egress.reused"])
        assert transport.connections_opened == 1
        assert transport.pool_stats() == (0, 1)
        await transport.aclose()
        return reused

    assert run(main()) == [False] + [True] * 19
    assert server.connections == 1  # one TLS handshake for 20 requests


@pytest.mark.parametrize("query", ["", "?chunked=1"], ids=["content_length", "chunked"])
def test_random_mebibyte_body_arrives_byte_exact(certs: Certs, server: Upstream, query: str) -> None:
    async def main() -> tuple[httpx.Response, bytes]:
        transport = transport_for(certs)
        result = await fetch(transport, make_request("GET", server.url(f"/bytes/{1 << 20}{query}")))
        await transport.aclose()
        return result

    response, body = run(main())
    assert response.status_code == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(seeded_bytes(1 << 20)).digest()
    framing = "transfer-encoding" if query else "content-length"
    assert framing in response.headers


def test_gzip_body_passes_byte_exact_with_its_encoding(certs: Certs, server: Upstream) -> None:
    async def main() -> tuple[httpx.Response, bytes]:
        transport = transport_for(certs)
        result = await fetch(transport, make_request("GET", server.url("/gzip")))
        await transport.aclose()
        return result

    response, body = run(main())
    assert body == GZIP_BODY  # raw: never decompressed
    assert response.headers["content-encoding"] == "gzip"


def test_request_head_goes_out_exactly_as_given(certs: Certs, server: Upstream) -> None:
    url = server.url("/head?a=%2F&b=%7e&c=x+y")

    async def main() -> tuple[httpx.Request, bytes]:
        transport = transport_for(certs)
        request = make_request(
            "GET", url, headers=[("X-Dup", "1"), ("x-dup", "2"), ("Accept-Encoding", "br"), ("X-Dup", "3")]
        )
        _, body = await fetch(transport, request)
        await transport.aclose()
        return request, body

    request, seen = run(main())
    expected = (
        b"GET " + request.url.raw_path + b" HTTP/1.1\r\n"
        b"Host: 127.0.0.1:" + str(server.port).encode() + b"\r\n"
        b"X-Dup: 1\r\nx-dup: 2\r\nAccept-Encoding: br\r\nX-Dup: 3\r\n\r\n"
    )
    assert seen == expected  # order, case and repeats kept; no User-Agent/Accept added
    assert request.url.raw_path == b"/head?a=%2F&b=%7e&c=x+y"


def test_repeated_response_headers_keep_values_and_order(certs: Certs, server: Upstream) -> None:
    async def main() -> httpx.Response:
        transport = transport_for(certs)
        response, _ = await fetch(transport, make_request("GET", server.url("/cookies")))
        await transport.aclose()
        return response

    response = run(main())
    assert response.headers.raw == [
        (b"Set-Cookie", b"a=1"), (b"X-Mid", b"m"), (b"Set-Cookie", b"b=2"), (b"Set-Cookie", b"c=3"),
        (b"Content-Length", b"2"),
    ]
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2", "c=3"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("HEAD", "/bytes/100", 200), ("HEAD", "/bytes/100?chunked=1", 200), ("GET", "/status/204", 204),
     ("GET", "/status/304", 304)],
    ids=["head_length", "head_chunked", "204", "304"],
)
def test_bodiless_responses_end_at_the_head_and_keep_the_connection(
    certs: Certs, server: Upstream, method: str, path: str, status: int
) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        response, body = await fetch(transport, make_request(method, server.url(path)))
        assert (response.status_code, body) == (status, b"")
        if method == "HEAD":
            assert response.headers.get("content-length", "100") == "100"
        # The next exchange on the same connection must parse cleanly.
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/1000")))
        assert body == seeded_bytes(1000)
        assert response.extensions["egress.reused"] is True
        await transport.aclose()

    run(main())
    assert server.connections == 1


def test_interim_1xx_response_is_skipped(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        response, body = await fetch(transport, make_request("GET", server.url("/early-hints")))
        assert (response.status_code, body) == (200, b"ok")
        assert "link" not in response.headers  # the 103's headers are not the response's
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10) and response.extensions["egress.reused"] is True
        await transport.aclose()

    run(main())


@pytest.mark.parametrize(
    ("path", "body", "version"),
    [("/close", b"ok", b"HTTP/1.1"), ("/http10", b"old server body", b"HTTP/1.0"),
     ("/until-close", b"body until close", b"HTTP/1.1")],
    ids=["connection_close", "http10_until_close", "http11_until_close"],
)
def test_responses_ending_the_connection_are_read_whole_and_not_reused(
    certs: Certs, server: Upstream, path: str, body: bytes, version: bytes
) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        response, got = await fetch(transport, make_request("GET", server.url(path)))
        assert got == body
        assert response.extensions["http_version"] == version
        assert transport.pool_stats() == (0, 0)
        response, got = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert got == seeded_bytes(10)
        assert response.extensions["egress.reused"] is False
        assert transport.connections_opened == 2
        await transport.aclose()

    run(main())


async def _generated(total: int, chunk: int, samples: list[int]) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * (chunk // 256)
    sent = 0
    while sent < total:
        yield block
        sent += len(block)
        if sent % (1 << 20) == 0:
            samples.append(rss_bytes())


@pytest.mark.parametrize("with_length", [False, True], ids=["chunked", "content_length"])
def test_streaming_upload_of_64_mib_keeps_memory_flat(certs: Certs, server: Upstream, with_length: bool) -> None:
    total = 64 << 20
    samples: list[int] = []

    async def main() -> dict[str, Any]:
        transport = transport_for(certs)
        headers = [("Content-Length", str(total))] if with_length else []
        request = make_request("POST", server.url("/upload"), headers=headers,
                               content=_generated(total, 65536, samples))
        baseline = rss_bytes()
        _, body = await fetch(transport, request)
        await transport.aclose()
        samples.insert(0, baseline)
        return dict(json.loads(body))

    answer = run(main())
    expected = hashlib.sha256(bytes(range(256)) * 256 * (total // 65536)).hexdigest()
    assert answer == {"length": total, "sha256": expected, "framing": "length" if with_length else "chunked"}
    assert max(samples) - samples[0] < 16 << 20, f"RSS grew by {(max(samples) - samples[0]) >> 20} MiB"


def test_in_memory_body_gets_a_content_length(certs: Certs, server: Upstream) -> None:
    async def main() -> dict[str, Any]:
        transport = transport_for(certs)
        request = httpx.Request("PUT", server.url("/upload"), stream=httpx.ByteStream(b"x" * 1000),
                                headers=[("Host", "h")], extensions={"timeout": {"read": 5.0}})
        _, body = await fetch(transport, request)
        await transport.aclose()
        return dict(json.loads(body))

    answer = run(main())
    assert answer["length"] == 1000 and answer["framing"] == "length"
    assert b"\r\nContent-Length: 1000\r\n" in server.heads[-1]


def test_stream_without_framing_header_empty_sends_no_body(certs: Certs, server: Upstream) -> None:
    async def nothing() -> AsyncIterator[bytes]:
        if False:  # pragma: no cover - an async generator that yields nothing
            yield b""

    async def main() -> bytes:
        transport = transport_for(certs)
        _, body = await fetch(transport, make_request("GET", server.url("/head"), stream=nothing()))
        await transport.aclose()
        return body

    head = run(main())
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()


def test_stream_without_framing_header_nonempty_goes_chunked(certs: Certs, server: Upstream) -> None:
    async def two() -> AsyncIterator[bytes]:
        yield b""
        yield b"abc"
        yield b"def"

    async def main() -> dict[str, Any]:
        transport = transport_for(certs)
        _, body = await fetch(transport, make_request("POST", server.url("/upload"), stream=two()))
        await transport.aclose()
        return dict(json.loads(body))

    answer = run(main())
    assert answer == {"length": 6, "sha256": hashlib.sha256(b"abcdef").hexdigest(), "framing": "chunked"}


def test_trace_events_come_in_httpcore_order(certs: Certs, server: Upstream) -> None:
    events: list[list[str]] = [[], []]

    async def main() -> None:
        transport = transport_for(certs)
        for index in range(2):
            async def trace(name: str, info: dict[str, Any], sink: list[str] = events[index]) -> None:
                assert isinstance(info, dict)
                sink.append(name)

            await fetch(transport, make_request("GET", server.url("/bytes/10"), trace=trace))
        await transport.aclose()

    run(main())
    exchange = [
        "http11.send_request_headers.started", "http11.send_request_headers.complete",
        "http11.receive_response_headers.started", "http11.receive_response_headers.complete",
    ]
    assert events[0] == [
        "connection.connect_tcp.started", "connection.connect_tcp.complete",
        "connection.start_tls.started", "connection.start_tls.complete", *exchange,
    ]
    assert events[1] == exchange  # reused: no connect, no handshake


def test_resolve_hook_dials_the_checked_addresses_in_order_with_sni_of_the_name(
    certs: Certs, server: Upstream
) -> None:
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append((host, port))
        # 127.0.0.2 is loopback but the upstream listens on 127.0.0.1 only: refused, next.
        return ["127.0.0.2", "127.0.0.1"]

    async def main() -> bytes:
        transport = transport_for(certs, resolve=resolve)
        _, body = await fetch(transport, make_request("GET", server.url("/bytes/10", host="upstream.test")))
        await transport.aclose()
        return body

    assert run(main()) == seeded_bytes(10)
    assert calls == [("upstream.test", server.port)]
    assert server.sni_names == ["upstream.test"]  # the certificate was checked for the name


def test_black_holed_address_does_not_use_up_the_connect_timeout(certs: Certs, server: Upstream) -> None:
    """Connect attempts share the connect timeout, so the next checked address still gets a turn."""
    # A listener with a full backlog on 127.0.0.3 drops further SYNs: a connect there hangs.
    hole = socket.socket()
    hole.bind(("127.0.0.3", server.port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.3", server.port))

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.3", "127.0.0.1"]

    async def main() -> bytes:
        transport = transport_for(certs, resolve=resolve)
        request = make_request("GET", server.url("/bytes/10", host="upstream.test"), timeouts={"connect": 1.0})
        _, body = await fetch(transport, request)
        await transport.aclose()
        return body

    try:
        assert run(main()) == seeded_bytes(10)
    finally:
        filler.close()
        hole.close()


def test_resolve_hook_denial_propagates_unchanged(certs: Certs, server: Upstream) -> None:
    class Denied(Exception):
        pass

    async def resolve(host: str, port: int) -> list[str]:
        raise Denied(host)

    async def main() -> None:
        transport = transport_for(certs, resolve=resolve)
        with pytest.raises(Denied, match="upstream.test"):
            await transport.handle_async_request(make_request("GET", server.url("/", host="upstream.test")))
        assert transport.pool_stats() == (0, 0)
        await transport.aclose()

    run(main())
    assert server.connections == 0


def test_plain_http_origin_is_served_without_tls(plain_server: Upstream) -> None:
    async def main() -> bytes:
        transport = HTTP11Transport(max_connections=2)
        _, body = await fetch(transport, make_request("GET", plain_server.url("/bytes/5000?chunked=1")))
        await transport.aclose()
        return body

    assert run(main()) == seeded_bytes(5000)


def test_transport_works_under_an_async_client_too(certs: Certs, server: Upstream) -> None:
    async def main() -> tuple[bytes, bytes]:
        transport = transport_for(certs)
        async with httpx.AsyncClient(transport=transport) as client:
            whole = await client.get(server.url("/bytes/2000"))
            async with client.stream("GET", server.url("/bytes/3000?chunked=1")) as streamed:
                parts = [chunk async for chunk in streamed.aiter_raw()]
            assert transport.connections_opened == 1
        return whole.content, b"".join(parts)

    whole, streamed = run(main())
    assert whole == seeded_bytes(2000)
    assert streamed == seeded_bytes(3000)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_literal_origin_is_dialled_and_verified() -> None:
    leaf_certs = Certs()
    leaf_certs.leaf = leaf_certs.ca.issue_cert("::1")
    server = Upstream(leaf_certs.server_context(), host="::1").start()
    try:
        async def main() -> bytes:
            transport = HTTP11Transport(leaf_certs.client_context())
            _, body = await fetch(transport, make_request("GET", f"https://[::1]:{server.port}/bytes/10"))
            await transport.aclose()
            return body

        assert run(main()) == seeded_bytes(10)
    finally:
        server.stop()
