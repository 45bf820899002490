"""HTTP11Transport failures: each raises the httpx exception the sidecar's error table expects."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from sidecar.errors import classify
from sidecar.upstream.transport import HTTP11Transport
from tests.servers.loop_upstream import Certs, Upstream, run, seeded_bytes, upstream
from tests.transport.helpers import certs, fetch, make_request, server, transport_for

__all__ = ["certs", "server"]  # fixtures used by name below


def _expect(certs: Certs, request: httpx.Request, error: type[Exception], **kwargs: object) -> BaseException:
    async def main() -> BaseException:
        transport = transport_for(certs, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(error) as info:
            await fetch(transport, request)
        assert transport.pool_stats() == (0, 0)  # the failed connection is gone, its slot free
        await transport.aclose()
        return info.value

    return run(main())


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port with a bound socket that does not listen: connecting is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket that never accepts: TCP connects, the TLS handshake never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_connect_refused_is_connect_error(certs: Certs, refusing_port: int) -> None:
    exc = _expect(certs, make_request("GET", f"https://127.0.0.1:{refusing_port}/"), httpx.ConnectError)
    assert isinstance(exc.__cause__, ConnectionRefusedError)
    assert classify(exc) == "connect_error"


def test_tls_handshake_that_never_answers_is_connect_timeout(certs: Certs, silent_port: int) -> None:
    request = make_request("GET", f"https://127.0.0.1:{silent_port}/", timeouts={"connect": 0.3})
    exc = _expect(certs, request, httpx.ConnectTimeout)
    assert classify(exc) == "connect_timeout"


def test_untrusted_certificate_is_connect_error_with_the_ssl_cause(certs: Certs) -> None:
    other = Certs()  # the upstream's certificate comes from a CA the client does not trust
    with upstream(other) as untrusted:
        exc = _expect(certs, make_request("GET", untrusted.url("/")), httpx.ConnectError)
    assert isinstance(exc.__cause__, ssl.SSLCertVerificationError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
    assert classify(exc) == "tls_error"


def test_mtls_upstream_accepts_a_client_certificate_and_refuses_its_absence(certs: Certs) -> None:
    server_context = certs.server_context()
    server_context.verify_mode = ssl.CERT_REQUIRED  # the upstream demands a client certificate
    certs.ca.configure_trust(server_context)
    with_cert = certs.client_context()
    certs.ca.issue_cert("client.test").configure_cert(with_cert)
    with upstream(certs, server_context) as mtls:
        async def main() -> bytes:
            good = HTTP11Transport(with_cert)
            _, body = await fetch(good, make_request("GET", mtls.url("/bytes/10")))
            await good.aclose()
            bad = transport_for(certs)  # trusts the server, has no client certificate
            # TLS 1.3 finishes the client's side of the handshake first: the refusal comes on
            # the first read, as a TLS alert (ReadError caused by ssl.SSLError; the sidecar's
            # tests/e2e/test_upstream_tls.py checks it maps to tls_error) or, from this asyncio
            # server that closes without flushing the alert, as a bare disconnect.
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await fetch(bad, make_request("GET", mtls.url("/bytes/10")))
            assert bad.pool_stats() == (0, 0)
            await bad.aclose()
            return body

        assert run(main()) == seeded_bytes(10)


def test_upstream_choosing_h2_through_alpn_is_refused(certs: Certs) -> None:
    server_context = certs.server_context()
    server_context.set_alpn_protocols(["h2"])
    client_context = certs.client_context()
    client_context.set_alpn_protocols(["h2", "http/1.1"])  # a context meant for an http2 pool
    with upstream(certs, server_context) as h2_only:
        async def main() -> BaseException:
            transport = HTTP11Transport(client_context)
            with pytest.raises(httpx.ConnectError) as info:
                await fetch(transport, make_request("GET", h2_only.url("/")))
            assert transport.pool_stats() == (0, 0)
            await transport.aclose()
            return info.value

        assert "negotiated 'h2'" in str(run(main()))


def test_resolve_hook_returning_nothing_is_connect_error(certs: Certs, server: Upstream) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return []

    _expect(certs, make_request("GET", server.url("/", host="upstream.test")), httpx.ConnectError, resolve=resolve)


def test_server_disconnect_before_headers_is_remote_protocol_error(certs: Certs, server: Upstream) -> None:
    exc = _expect(certs, make_request("GET", server.url("/disconnect")), httpx.RemoteProtocolError)
    assert str(exc) == "Server disconnected without sending a response."
    assert classify(exc) == "upstream_reset"


def test_server_reset_before_headers_is_read_error(certs: Certs, server: Upstream) -> None:
    exc = _expect(certs, make_request("GET", server.url("/reset")), httpx.ReadError)
    assert classify(exc) == "upstream_reset"


def test_malformed_response_is_remote_protocol_error(certs: Certs, server: Upstream) -> None:
    exc = _expect(certs, make_request("GET", server.url("/malformed")), httpx.RemoteProtocolError)
    assert classify(exc) == "protocol_error"


@pytest.mark.parametrize("path", ["/huge-head", "/endless-header"], ids=["complete", "never_ending"])
def test_oversized_response_head_is_remote_protocol_error(certs: Certs, server: Upstream, path: str) -> None:
    exc = _expect(certs, make_request("GET", server.url(path)), httpx.RemoteProtocolError)
    assert "larger than" in str(exc)


def test_oversized_trailer_section_is_remote_protocol_error(certs: Certs, server: Upstream) -> None:
    async def main() -> bytes:
        transport = transport_for(certs)
        response = await transport.handle_async_request(make_request("GET", server.url("/huge-trailer")))
        received = b""
        with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
            async for chunk in response.aiter_raw():
                received += chunk
        assert transport.pool_stats() == (0, 0)
        await transport.aclose()
        return received

    assert run(main()) == b"ok"


def test_early_error_response_stops_the_upload_instead_of_timing_out(certs: Certs, server: Upstream) -> None:
    async def endless() -> AsyncIterator[bytes]:
        block = b"x" * 65536
        for _ in range(4096):  # bounded: 256 MiB at most
            yield block

    async def main() -> None:
        transport = transport_for(certs)
        # The server answers 413 and stops reading: without watching for that answer the
        # upload would block until the write timeout.
        request = make_request("POST", server.url("/early-413"), content=endless(), timeouts={"write": 2.0})
        response, body = await fetch(transport, request)
        assert (response.status_code, body) == (413, b"too large")
        assert transport.pool_stats() == (0, 0)  # the cut-short request's connection is closed
        await transport.aclose()

    run(main())


def test_stall_before_headers_is_read_timeout(certs: Certs, server: Upstream) -> None:
    exc = _expect(certs, make_request("GET", server.url("/stall"), timeouts={"read": 0.3}), httpx.ReadTimeout)
    assert classify(exc) == "read_timeout"


def test_read_timeouts_follow_each_request_on_a_reused_connection(certs: Certs, server: Upstream) -> None:
    """The read timer is armed once per connection and moved lazily: each request must still
    get exactly its own read timeout, shorter or longer than the one before."""

    async def main() -> None:
        transport = transport_for(certs)
        loop = asyncio.get_running_loop()
        await fetch(transport, make_request("GET", server.url("/bytes/10"), timeouts={"read": 0.3}))
        # Longer than the previous request's timeout: the old timer firing at 0.3 s must not
        # end this one, which answers after 0.6 s.
        response, body = await fetch(transport, make_request("GET", server.url("/delay/600"),
                                                               timeouts={"read": 3.0}))
        assert body == b"ok" and response.extensions["egress.reused"] is True
        # Shorter than the timer now armed (3 s): must time out at 0.2 s, not later.
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await fetch(transport, make_request("GET", server.url("/stall"), timeouts={"read": 0.2}))
        assert loop.time() - started < 1.5
        await transport.aclose()

    run(main())


def test_reset_mid_body_is_read_error_after_the_bytes_that_came(certs: Certs, server: Upstream) -> None:
    async def main() -> int:
        transport = transport_for(certs)
        response = await transport.handle_async_request(make_request("GET", server.url("/reset-mid-body")))
        received = 0
        with pytest.raises(httpx.ReadError):
            async for chunk in response.aiter_raw():
                received += len(chunk)
        assert transport.pool_stats() == (0, 0)
        await transport.aclose()
        return received

    assert 0 < run(main()) < 1 << 20


def test_server_that_stops_reading_is_write_timeout(certs: Certs, server: Upstream) -> None:
    async def endless() -> AsyncIterator[bytes]:
        block = b"x" * 65536
        for _ in range(4096):  # bounded: 256 MiB at most, far past any socket buffer
            yield block

    request = make_request("POST", server.url("/no-read"), content=endless(), timeouts={"write": 0.3})
    exc = _expect(certs, request, httpx.WriteTimeout)
    assert classify(exc) == "write_timeout"


def test_dead_reused_connection_is_retried_once_for_an_idempotent_request(certs: Certs, server: Upstream) -> None:
    async def main() -> httpx.Response:
        transport = transport_for(certs)
        await fetch(transport, make_request("GET", server.url("/drop-next")))
        # The server drops the next request on that connection without answering (the race of
        # a keep-alive close): the transport sends it again on a new connection.
        response, body = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert body == seeded_bytes(10)
        assert transport.connections_opened == 2
        await transport.aclose()
        return response

    response = run(main())
    assert response.extensions["egress.reused"] is False
    assert server.connections == 2


def test_keep_alive_race_retry_can_be_turned_off(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs, retry_stale=False)
        await fetch(transport, make_request("GET", server.url("/drop-next")))
        with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected"):
            await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert transport.connections_opened == 1
        await transport.aclose()

    run(main())


def test_reset_on_a_reused_connection_is_not_retried_by_the_transport(certs: Certs, server: Upstream) -> None:
    """A reset is not the keep-alive race: the sidecar's retry policy decides, and counts."""

    async def main() -> None:
        transport = transport_for(certs)
        await fetch(transport, make_request("GET", server.url("/reset-next")))
        with pytest.raises(httpx.ReadError):
            await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert transport.connections_opened == 1
        await transport.aclose()

    run(main())
    assert server.requests == 2


@pytest.mark.parametrize(
    ("method", "streamed"), [("POST", False), ("PUT", True)], ids=["post_not_idempotent", "consumed_stream"]
)
def test_dead_reused_connection_is_not_retried_when_unsafe(
    certs: Certs, server: Upstream, method: str, streamed: bool
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"payload"

    async def main() -> None:
        transport = transport_for(certs)
        await fetch(transport, make_request("GET", server.url("/drop-next")))
        request = make_request(method, server.url("/upload"), content=body() if streamed else b"payload")
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await fetch(transport, request)
        assert transport.connections_opened == 1
        assert transport.pool_stats() == (0, 0)
        await transport.aclose()

    run(main())
    assert server.requests == 2  # the upstream saw the request once, never a replay


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "https:///x"], ids=["scheme", "no_host"])
def test_unusable_url_is_unsupported_protocol_before_any_connection(certs: Certs, url: str) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        request = httpx.Request("GET", url, headers=[("Host", "x")], extensions={"timeout": {}})
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(request)
        assert transport.connections_opened == 0 and transport.pool_stats() == (0, 0)
        await transport.aclose()

    run(main())
