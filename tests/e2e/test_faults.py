"""The fault suite: each upstream or client failure, with real sockets.

Each case asserts what the app sees, what the upstream saw, and that the pool is healthy
afterwards (fault_support.assert_pool_healthy: with 4 slots and a 0.5 s pool wait, one
leaked slot fails it). Route retries are off here (tests/e2e/test_resilience_* cover them);
the transport's own one retry of the keep-alive race is on, as in production.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import trustme

from tests.conftest import Sidecar
from tests.e2e.fault_support import SMALL_POOL, assert_pool_healthy, assert_sidecar_error, established_to
from tests.e2e.test_transparency import raw_request, split_response
from tests.servers.upstream import SilentTLSServer, Upstream, UpstreamServer, wait_until


@pytest.fixture
def faulty(make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream) -> Sidecar:
    """Routes to the test's own upstream: `/up` with a 1 s read timeout, `/long` with 30 s."""
    return make_sidecar(
        routes=[
            {"name": "up", "prefix": "/up", "upstream": fresh_upstream.base, "timeouts": {"read": "1s"}},
            {"name": "long", "prefix": "/long", "upstream": fresh_upstream.base, "timeouts": {"read": "30s"}},
        ],
        **SMALL_POOL,
    )


def closed_port() -> int:
    with socket.socket() as sock:  # bound then released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the upstream fails ------------------------------------------------------------------------

def test_upstream_refusing_connections_is_a_502_connect_error(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[
        {"name": "up", "prefix": "/up", "upstream": fresh_upstream.base},
        {"name": "refused", "prefix": "/refused", "upstream": f"https://localhost:{closed_port()}"},
    ], **SMALL_POOL)
    for _ in range(8):  # more failures than slots: a failed connect must not keep its slot
        assert_sidecar_error(sidecar, httpx.get(f"{sidecar.url}/refused/echo"), 502, "connect_error")
    assert_pool_healthy(sidecar)


def test_reset_before_headers_is_a_502_upstream_reset(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    for _ in range(8):
        assert_sidecar_error(faulty, httpx.get(f"{faulty.url}/up/reset"), 502, "upstream_reset")
    assert [seen.target for seen in fresh_upstream.requests] == ["/reset"] * 8
    assert_pool_healthy(faulty)


def test_reset_mid_body_truncates_the_response_never_a_short_200(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    received = bytearray()
    # The body ends short of its Content-Length: httpx raises rather than return a short body.
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{faulty.url}/up/reset-mid") as response:
        assert response.status_code == 200 and response.headers["content-length"] == "100000"
        for chunk in response.iter_raw():
            received += chunk
    assert 0 < len(received) < 100000
    # The raw bytes too: the sidecar closed the connection without completing the body.
    status, headers, body = split_response(raw_request(faulty.port, f"GET /up/reset-mid HTTP/1.1\r\nHost: "
                                                                    f"127.0.0.1:{faulty.port}\r\n\r\n".encode()))
    assert status == 200 and dict(headers)["content-length"] == "100000" and len(body) < 100000
    faulty.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "upstream_reset"
                    and "after response start" in e.get("detail", ""))
    assert_pool_healthy(faulty)


def test_stall_before_headers_is_a_504_read_timeout_and_the_upstream_is_let_go(
    faulty: Sidecar, fresh_upstream: Upstream
) -> None:
    started = time.monotonic()
    assert_sidecar_error(faulty, httpx.get(f"{faulty.url}/up/stall", timeout=10), 504, "read_timeout")
    assert 0.9 <= time.monotonic() - started < 3
    wait_until(lambda: fresh_upstream.requests[0].peer_closed, timeout=3, message="sidecar closes the stalled request")
    assert_pool_healthy(faulty)


def test_stall_mid_body_truncates_after_the_read_timeout(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    received = bytearray()
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", f"{faulty.url}/up/stall-mid",
                                                                 timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert len(received) == 1024 and 0.9 <= time.monotonic() - started < 3
    wait_until(lambda: fresh_upstream.requests[0].peer_closed, timeout=3, message="sidecar closes the stalled request")
    faulty.wait_log(lambda e: e.get("kind") == "read_timeout" and "after response start" in e.get("detail", ""))
    assert_pool_healthy(faulty)


def test_a_keep_alive_connection_the_upstream_closed_is_not_reused(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    assert httpx.get(f"{faulty.url}/up/echo").status_code == 200
    assert established_to(fresh_upstream.port, faulty.proc.pid) == 1  # the probe sees the pooled connection
    assert httpx.get(f"{faulty.url}/up/close-after").content == b"ok"  # on that same connection
    # The upstream closed its side after a keep-alive response. Once that FIN is in the
    # sidecar's socket (it leaves ESTABLISHED), the pool must see the connection is dead
    # (httpcore polls an idle socket for readability before reusing it).
    wait_until(lambda: established_to(fresh_upstream.port, faulty.proc.pid) == 0, timeout=3,
               message="the upstream's FIN reached the sidecar")
    response = httpx.get(f"{faulty.url}/up/echo")
    assert response.status_code == 200, response.text
    assert fresh_upstream.connections == 2
    assert [seen.connection for seen in fresh_upstream.requests] == [1, 1, 2]
    assert_pool_healthy(faulty)


def test_a_keep_alive_connection_dropped_as_it_is_reused_is_sent_again_for_a_get(
    faulty: Sidecar, fresh_upstream: Upstream
) -> None:
    # The race proper: the upstream gives up on the idle connection (a clean close) only
    # after the next request was written to it. The route has no retries: the transport's
    # one silent retry of this race (sidecar/transport, wire.may_retry_on_fresh: reused
    # connection, clean close, no response byte, idempotent method, replayable body) sends
    # the GET again on a fresh connection, and the app never sees the race.
    assert httpx.get(f"{faulty.url}/up/drop-next").content == b"ok"
    response = httpx.get(f"{faulty.url}/up/echo")
    assert response.status_code == 200, response.text
    assert [(seen.target, seen.connection) for seen in fresh_upstream.requests] == [
        ("/drop-next", 1), ("/echo", 1), ("/echo", 2)]
    assert_pool_healthy(faulty)


def test_a_keep_alive_connection_dropped_as_it_is_reused_is_a_502_for_a_post(
    faulty: Sidecar, fresh_upstream: Upstream
) -> None:
    # The same race for a POST: not idempotent (RFC 9110 9.2.2), and its streamed body is
    # gone, so it is never sent twice: the app gets the error and decides.
    assert httpx.get(f"{faulty.url}/up/drop-next").content == b"ok"
    assert_sidecar_error(faulty, httpx.post(f"{faulty.url}/up/echo", content=b"p" * 1000), 502, "upstream_reset")
    assert [(seen.method, seen.target, seen.connection) for seen in fresh_upstream.requests] == [
        ("GET", "/drop-next", 1), ("POST", "/echo", 1)]
    assert httpx.get(f"{faulty.url}/up/echo").status_code == 200  # the dead connection left the pool
    assert_pool_healthy(faulty)


def test_garbage_instead_of_a_response_is_a_502_protocol_error(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    for _ in range(6):
        assert_sidecar_error(faulty, httpx.get(f"{faulty.url}/up/garbage"), 502, "protocol_error")
    assert len(fresh_upstream.requests) == 6
    assert_pool_healthy(faulty)


# -- TLS ---------------------------------------------------------------------------------------

def _expired(ca: trustme.CA) -> ssl.SSLContext:
    now = datetime.datetime.now(datetime.UTC)
    return _context(ca.issue_cert("localhost", "127.0.0.1", not_before=now - datetime.timedelta(days=30),
                                  not_after=now - datetime.timedelta(days=1)))


def _wrong_host(ca: trustme.CA) -> ssl.SSLContext:
    return _context(ca.issue_cert("someone-else.test"))


def _unknown_ca(ca: trustme.CA) -> ssl.SSLContext:
    return _context(trustme.CA().issue_cert("localhost", "127.0.0.1"))


def _context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture
def tls_upstream(request: pytest.FixtureRequest, ca: trustme.CA) -> Iterator[Upstream]:
    server = UpstreamServer(request.param(ca))
    state = server.start()
    yield state
    server.stop()


@pytest.mark.parametrize("tls_upstream", [_expired, _wrong_host, _unknown_ca], indirect=True,
                         ids=["expired", "wrong_host", "unknown_ca"])
def test_a_bad_upstream_certificate_is_a_502_tls_error(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, tls_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[
        {"name": "up", "prefix": "/up", "upstream": fresh_upstream.base},
        {"name": "bad", "prefix": "/bad", "upstream": tls_upstream.base},
    ], **SMALL_POOL)
    for _ in range(6):
        assert_sidecar_error(sidecar, httpx.get(f"{sidecar.url}/bad/echo"), 502, "tls_error")
    assert tls_upstream.requests == []  # not one request left in the clear
    assert_pool_healthy(sidecar)


def test_a_tls_handshake_that_stalls_is_a_504_connect_timeout(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    silent = SilentTLSServer()
    try:
        sidecar = make_sidecar(routes=[
            {"name": "up", "prefix": "/up", "upstream": fresh_upstream.base},
            {"name": "silent", "prefix": "/silent", "upstream": f"https://localhost:{silent.port}",
             "timeouts": {"connect": "500ms"}},
        ], **SMALL_POOL)
        for _ in range(5):
            started = time.monotonic()
            assert_sidecar_error(sidecar, httpx.get(f"{sidecar.url}/silent/x", timeout=10), 504, "connect_timeout")
            assert time.monotonic() - started < 2
        wait_until(lambda: len(silent.accepted) == 5, timeout=3, message="five handshakes began")
        # The sidecar gave up each handshake by closing its socket: the silent server reads EOF.
        for conn in silent.accepted:
            conn.settimeout(3)
            assert conn.recv(65536, socket.MSG_PEEK) in (b"",) or _drained_to_eof(conn)
        assert_pool_healthy(sidecar)
    finally:
        silent.stop()


def _drained_to_eof(conn: socket.socket) -> bool:
    while data := conn.recv(65536):  # the ClientHello, then EOF
        assert data
    return True


# -- the app (client) goes away ------------------------------------------------------------------

def test_client_abort_before_headers_closes_the_upstream_request(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    with socket.create_connection(("127.0.0.1", faulty.port)) as sock:
        sock.sendall(f"GET /long/stall HTTP/1.1\r\nHost: 127.0.0.1:{faulty.port}\r\n\r\n".encode())
        wait_until(lambda: fresh_upstream.requests, timeout=5, message="request reached the upstream")
    aborted = time.monotonic()
    # The route waits 30 s for headers; the sidecar must not: the app is gone, so is the request.
    wait_until(lambda: fresh_upstream.requests[0].peer_closed, timeout=3, message="upstream sees the close")
    assert time.monotonic() - aborted < 3
    faulty.wait_log(lambda e: e.get("kind") == "client_disconnected")
    assert_pool_healthy(faulty)


def test_client_abort_mid_body_closes_the_upstream_response(faulty: Sidecar, fresh_upstream: Upstream) -> None:
    for _ in range(10):
        with httpx.stream("GET", f"{faulty.url}/long/slow?n=100&interval=0.1") as response:
            assert response.status_code == 200
            for _chunk in response.iter_raw():
                break
    # Each upstream handler notices at its next write that the sidecar closed the connection.
    wait_until(lambda: fresh_upstream.open_connections == 0, timeout=3, message="upstream connections closed")
    assert fresh_upstream.connections == 10
    assert_pool_healthy(faulty)


def test_client_abort_during_a_large_upload_leaves_the_upstream_an_incomplete_body(
    faulty: Sidecar, fresh_upstream: Upstream
) -> None:
    declared, sent = 64 << 20, 8 << 20
    with socket.create_connection(("127.0.0.1", faulty.port)) as sock:
        sock.sendall(f"POST /long/echo HTTP/1.1\r\nHost: 127.0.0.1:{faulty.port}\r\ncontent-length: {declared}"
                     "\r\n\r\n".encode())
        block = b"u" * 65536
        for _ in range(sent // len(block)):
            sock.sendall(block)
        wait_until(lambda: fresh_upstream.requests and fresh_upstream.requests[0].body_size >= sent // 2,
                   timeout=10, message="upload streaming upstream")
    seen = wait_until(lambda: fresh_upstream.requests[0].peer_closed and fresh_upstream.requests[0], timeout=5,
                      message="upstream sees the upload cut")
    assert not seen.body_complete and seen.body_size <= sent
    faulty.wait_log(lambda e: e.get("kind") == "client_disconnected")
    assert_pool_healthy(faulty)


# -- the health check itself ---------------------------------------------------------------------

def test_the_pool_health_check_catches_one_busy_slot(faulty: Sidecar) -> None:
    # The positive control for every assert_pool_healthy above: one connection held elsewhere
    # (as a leaked slot would be) makes one of the four holds wait past the pool wait.
    with httpx.stream("GET", f"{faulty.url}/long/slow?n=40&interval=0.1") as held:
        assert held.status_code == 200
        with pytest.raises(AssertionError) as failure:
            assert_pool_healthy(faulty)
    assert "503" in str(failure.value) and "pool_timeout" in str(failure.value)
    faulty.wait_log(lambda e: e.get("kind") == "pool_timeout")
