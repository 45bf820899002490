"""Limits against abuse from inside the pod: oversized heads, slow heads, idle bodies."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Sidecar
from tests.e2e.test_errors import assert_error
from tests.e2e.test_transparency import raw_request, split_response
from tests.upstream import Upstream, wait_until

LIMITS = {"max_request_line": 1024, "max_headers": 20, "max_header_bytes": 4096,
          "header_timeout": "1s", "body_idle_timeout": "2s"}


@pytest.fixture(params=["httptools", "h11"])
def limited(make_sidecar: Callable[..., Sidecar], upstream: Upstream, request: pytest.FixtureRequest) -> Sidecar:
    """The same limits on both listener parsers (limits.py, h11_protocol.py)."""
    return make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}],
                        limits=LIMITS, listen={"http": request.param})


def head(sidecar: Sidecar, target: str = "/up/echo", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n{extra}Connection: close\r\n\r\n".encode()


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_request_target_past_the_limit_gets_414(limited: Sidecar) -> None:
    at_limit = "/up/echo?q=" + "a" * (1024 - len("/up/echo?q="))
    status, _, body = split_response(raw_request(limited.port, head(limited, at_limit)))
    assert status == 200 and json.loads(body)["target"] == at_limit[len("/up"):]
    assert_error(limited, raw_request(limited.port, head(limited, at_limit + "a")), 414, "uri_too_long")


def test_too_many_header_fields_get_431(limited: Sidecar) -> None:
    # Host and Connection plus 18 more make the 20 allowed; one more is refused.
    fields = "".join(f"x-h{i}: v\r\n" for i in range(18))
    assert split_response(raw_request(limited.port, head(limited, extra=fields)))[0] == 200
    assert_error(limited, raw_request(limited.port, head(limited, extra=fields + "x-one-more: v\r\n")), 431,
                 "header_too_large")


def test_header_bytes_past_the_limit_get_431(limited: Sidecar) -> None:
    assert split_response(raw_request(limited.port, head(limited, extra=f"x-big: {'b' * 3000}\r\n")))[0] == 200
    too_big = f"x-big: {'b' * 3000}\r\nx-big2: {'b' * 1100}\r\n"
    assert_error(limited, raw_request(limited.port, head(limited, extra=too_big)), 431, "header_too_large")


def test_an_endless_header_line_is_refused_without_buffering_it(limited: Sidecar) -> None:
    # httptools buffers a header until its line ends; the sidecar must stop long before 4 MiB.
    rss_before = limited.rss_kib()
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(f"GET /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{limited.port}\r\nx-endless: ".encode())
        sent = 0
        try:
            while sent < 4 << 20:
                sock.sendall(b"e" * 65536)
                sent += 65536
        except OSError:
            pass  # the sidecar closed after its lingering period: fine, the answer is already queued
        raw = read_all(sock)
    assert_error(limited, raw, 431, "header_too_large")
    line = limited.wait_log(lambda e: e.get("kind") == "header_too_large" and "incomplete" in e.get("detail", ""))
    read_before_refusal = int(line["detail"].split("after ")[1].split()[0])
    assert read_before_refusal < 1024 + 4096 + 4 * 20 + 1024 + 256 * 1024  # the guard plus at most one read
    assert limited.rss_kib() - rss_before < 8 * 1024


def test_a_request_head_that_trickles_past_the_deadline_gets_408(limited: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /up/echo HTTP/1.1\r\n")
        sock.settimeout(0.2)
        raw = b""
        # Slowloris: one header byte every 0.2 s keeps the connection busy but never ends the head.
        while not raw and time.monotonic() - started < 5:
            try:
                sock.sendall(b"x")
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        sock.settimeout(5)
        raw += read_all(sock)
        elapsed = time.monotonic() - started
    assert_error(limited, raw, 408, "client_timeout")
    assert 0.9 <= elapsed < 3.0  # the deadline is for the whole head, whatever trickles in


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(limited: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""  # closed, and no 408 a reusing client could misread
        assert 0.9 <= time.monotonic() - started < 3.0
    limited.wait_log(lambda e: e.get("kind") == "client_timeout" and "sent nothing" in e.get("detail", ""))


def test_an_idle_keep_alive_connection_is_not_cut_by_the_head_deadline(limited: Sidecar) -> None:
    with httpx.Client(base_url=limited.url) as client:
        assert client.get("/up/echo").status_code == 200
        time.sleep(1.5)  # the condition under test: idle longer than header_timeout (1 s)
        response = client.get("/up/echo")
        assert response.status_code == 200
    assert response.extensions["network_stream"] is not None


def test_an_unparsable_request_gets_our_400(limited: Sidecar) -> None:
    assert_error(limited, raw_request(limited.port, b"GET /up/echo HTTP/1.1\r\nBad Header\r\n\r\n"), 400,
                 "bad_request")


def trickle(chunks: int, interval: float) -> Iterator[bytes]:
    for index in range(chunks):
        if index:
            time.sleep(interval)  # the behaviour under test: a body that arrives slowly
        yield b"t" * 100


def test_a_body_that_trickles_for_longer_than_the_idle_timeout_succeeds(limited: Sidecar) -> None:
    # Five chunks one second apart: 5 s in all, never 2 s of silence.
    response = httpx.post(f"{limited.url}/up/echo", content=trickle(5, 1.0), timeout=30)
    assert response.status_code == 200, response.text
    assert json.loads(response.content)["body_size"] == 500


def test_a_body_that_stops_gets_408_and_the_upstream_sees_it_cut(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": fresh_upstream.base}],
                           limits=LIMITS)
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\ncontent-length: 1000\r\n\r\n"
                     .encode() + b"s" * 100)
        raw = read_all(sock)
        elapsed = time.monotonic() - started
    assert_error(sidecar, raw, 408, "client_timeout")
    assert 1.9 <= elapsed < 4.0
    seen = wait_until(lambda: fresh_upstream.requests and fresh_upstream.requests[0].peer_closed
                      and fresh_upstream.requests[0], timeout=5, message="upstream sees the cut body")
    assert seen.body_size == 100 and not seen.body_complete
    assert httpx.get(f"{sidecar.url}/up/echo", timeout=5).status_code == 200
