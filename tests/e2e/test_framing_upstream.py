"""A hostile upstream (tests/servers/loop_upstream.py HOSTILE: scripted raw bytes in one write)
against the transport and through the real sidecar: bytes after a complete response close
that upstream connection and the app gets exactly the first response; a 101 is a
protocol_error, never relayed; the next request is unharmed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
import trustme

from sidecar.errors import classify
from tests.conftest import Sidecar, server_context
from tests.e2e.framing_support import exchange
from tests.prometheus import samples, scrape, total
from tests.servers.loop_upstream import Certs, Upstream, run, seeded_bytes, upstream
from tests.servers.upstream import wait_until
from tests.transport.helpers import certs, fetch, make_request, server, transport_for

__all__ = ["certs", "server"]  # fixtures used by name below

# path, method -> what the app must get: status, headers it must carry, body.
SURPLUS = {
    "two-responses": ("GET", 304, {"etag": '"x"'}, b""),
    "extra-after-body": ("GET", 200, {"content-length": "5"}, b"HELLO"),
    # Before: the second response's head replaced the first's and both bodies were relayed
    # under it, so the app saw an aborted response and the sidecar an `internal` error.
    "body-then-response": ("GET", 200, {"content-length": "5"}, b"HELLO"),
    "extra-after-chunked": ("GET", 200, {"transfer-encoding": "chunked"}, b"HELLO"),
    "extra-after-head": ("HEAD", 200, {"content-length": "5"}, b""),
}


# ---- the transport ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SURPLUS))
def test_transport_gives_exactly_the_first_response_and_closes_the_connection(
    certs: Certs, server: Upstream, path: str
) -> None:
    method, status, headers, body = SURPLUS[path]

    async def main() -> None:
        transport = transport_for(certs)
        response, got = await fetch(transport, make_request(method, server.url(f"/{path}")))
        assert response.status_code == status
        assert {k: response.headers[k] for k in headers} == headers
        assert got == body
        assert response.stream.violation is not None  # type: ignore[attr-defined]
        assert transport.pool_stats() == (0, 0)  # not back in the pool: closed
        # The next request is unharmed, on a new connection.
        response, got = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert (response.status_code, got) == (200, seeded_bytes(10))
        assert response.stream.violation is None  # type: ignore[attr-defined]
        assert server.connections == 2
        await transport.aclose()

    run(main())


def test_transport_refuses_a_101_as_a_protocol_error(certs: Certs, server: Upstream) -> None:
    async def main() -> None:
        transport = transport_for(certs)
        with pytest.raises(httpx.RemoteProtocolError) as refused:
            await transport.handle_async_request(make_request("GET", server.url("/switching")))
        assert classify(refused.value) == "protocol_error"
        assert "101" in str(refused.value)
        assert transport.pool_stats() == (0, 0)
        response, got = await fetch(transport, make_request("GET", server.url("/bytes/10")))
        assert (response.status_code, got) == (200, seeded_bytes(10))
        await transport.aclose()

    run(main())


# ---- through the sidecar ----------------------------------------------------------------------


@pytest.fixture
def hostile(ca: trustme.CA) -> Iterator[Upstream]:
    """The scripted upstream with the conftest CA, so the sidecar trusts it."""
    with upstream(None, context=server_context(ca)) as running:
        yield running


def _protocol_errors(sidecar: Sidecar) -> float:
    return total(samples(scrape(sidecar.admin_url)), "egress_errors_total", kind="protocol_error")


@pytest.mark.parametrize("path", sorted(SURPLUS))
def test_app_gets_exactly_the_first_response_and_the_next_request_is_unharmed(
    make_sidecar: Callable[..., Sidecar], hostile: Upstream, path: str
) -> None:
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{hostile.port}"}])
    method, status, headers, body = SURPLUS[path]
    host = f"127.0.0.1:{sidecar.port}"
    # Raw, to see every byte the app is sent: one response, then the close the app asked for.
    done = exchange(sidecar.port, f"{method} /up/{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert done.closed and not done.reset
    assert b"POISON" not in done.raw
    assert [answer.status for answer in done.answers] == [status]
    answer = done.answers[0]
    assert {k: answer.headers[k.encode()].decode() for k in headers if k != "transfer-encoding"} == {
        k: v for k, v in headers.items() if k != "transfer-encoding"}
    assert answer.body == body
    assert b"x-egress-error" not in answer.headers  # the app's answer is the upstream's
    line = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("path") == f"/{path}")
    assert (line["kind"], line["status"]) == ("protocol_error", status)
    assert "after a complete response" in line["detail"]
    assert _protocol_errors(sidecar) == 1
    # The next request, on a keep-alive connection of the app, gets a new upstream connection.
    connections = hostile.connections
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            response = client.get(f"{sidecar.url}/up/bytes/10")
            assert (response.status_code, response.content) == (200, seeded_bytes(10))
    assert hostile.connections == connections + 1


@pytest.mark.parametrize("path", ["switching", "length-and-chunked", "two-lengths"])
def test_a_101_or_ambiguous_response_framing_is_a_502_protocol_error_with_nothing_relayed(
    make_sidecar: Callable[..., Sidecar], hostile: Upstream, path: str
) -> None:
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{hostile.port}"}])
    done = exchange(sidecar.port, f"GET /up/{path} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
                                  "Connection: close\r\n\r\n".encode())
    assert b"POISON" not in done.raw and b"101" not in done.raw.split(b"\r\n", 1)[0]
    assert [answer.status for answer in done.answers] == [502]
    assert done.answers[0].headers[b"x-egress-error"] == b"protocol_error"
    wait_until(lambda: _protocol_errors(sidecar) == 1, timeout=5, message="protocol_error counted")
    with httpx.Client(timeout=10) as client:
        response = client.get(f"{sidecar.url}/up/bytes/10")
    assert (response.status_code, response.content) == (200, seeded_bytes(10))



@pytest.mark.parametrize("path", sorted(SURPLUS))
def test_on_an_http2_route_falling_back_to_http11_surplus_bytes_never_answer_the_next_request(
    make_sidecar: Callable[..., Sidecar], hostile: Upstream, path: str
) -> None:
    """httpcore speaks HTTP/1.1 when the upstream's ALPN picks it (sidecar/_compat/httpcore.py close_after_surplus):
    without the rule, the bytes after the first response answered the next request."""
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "http2": True,
                                    "upstream": f"https://localhost:{hostile.port}"}])
    method, status, _, body = SURPLUS[path]
    with httpx.Client(timeout=10) as client:
        first = client.request(method, f"{sidecar.url}/up/{path}")
        assert (first.status_code, first.content) == (status, body)
        connections = hostile.connections
        for _ in range(2):
            response = client.get(f"{sidecar.url}/up/bytes/10")
            assert (response.status_code, response.content) == (200, seeded_bytes(10))
    assert hostile.connections == connections + 1  # the poisoned connection was not reused
