"""The app cannot tell the sidecar is there: addressing, headers, bodies, cookies, redirects."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Sidecar
from tests.servers.upstream import GZIP_PAYLOAD, Upstream, random_bytes, wait_until


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send exact bytes to the sidecar and read until it closes (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def split_response(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
    return status, headers, body


def test_forward_proxy_form_with_curl_originates_tls(sidecar: Sidecar, upstream: Upstream) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-x", sidecar.url, f"http://localhost:{upstream.port}/echo?a=1"],
        capture_output=True, timeout=30, check=True,
    )
    seen = json.loads(result.stdout)
    assert seen["target"] == "/echo?a=1"
    assert ("host", f"localhost:{upstream.port}") in [tuple(h) for h in seen["headers"]]


def test_forward_proxy_form_with_http_proxy_env(sidecar: Sidecar, upstream: Upstream) -> None:
    env = {"HTTP_PROXY": sidecar.url, "http_proxy": sidecar.url, "NO_PROXY": "", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["curl", "-sS", f"http://localhost:{upstream.port}/echo"],
                            capture_output=True, timeout=30, check=True, env=env)
    assert json.loads(result.stdout)["target"] == "/echo"


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_absolute_uri_and_host_header_both_route(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, parser: str
) -> None:
    sidecar = make_sidecar(listen={"http": parser})
    raw = raw_request(
        sidecar.port,
        f"GET http://localhost:{upstream.port}/echo/x?q=1 HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    status, _, body = split_response(raw)
    assert status == 200
    assert json.loads(body)["target"] == "/echo/x?q=1"


def test_named_route_keeps_raw_path_and_query_exactly(sidecar: Sidecar) -> None:
    # Bytes httpx would re-quote (|, ', {, }), percent escapes in both cases, '+' and empty values.
    target = "/up/echo/a%2Fb/c%20d/%7e|'{x}?x=%41&y=1+2&z=&w=a|b&%e2%82%ac"
    raw = raw_request(sidecar.port, f"GET {target} HTTP/1.1\r\nHost: {sidecar.url[7:]}\r\n"
                                    "Connection: close\r\n\r\n".encode())
    status, _, body = split_response(raw)
    assert status == 200, body
    assert json.loads(body)["target"] == target[len("/up"):]


def test_route_prefix_alone_maps_to_root(sidecar: Sidecar, upstream: Upstream) -> None:
    response = httpx.get(f"{sidecar.url}/upx/echo")
    assert response.status_code == 404
    assert response.headers["x-egress-error"] == "no_route"


def test_upstream_sees_exactly_the_apps_headers(sidecar: Sidecar, upstream: Upstream) -> None:
    request = (
        f"POST /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
        "X-Custom: One\r\nx-custom: two\r\nAccept: text/weird\r\nContent-Type: application/x-test\r\n"
        "X-Request-Id: req-123\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    ).encode()
    status, _, body = split_response(raw_request(sidecar.port, request))
    assert status == 200
    seen = json.loads(body)
    assert [tuple(h) for h in seen["headers"]] == [
        ("host", f"localhost:{upstream.port}"),
        ("x-custom", "One"),
        ("x-custom", "two"),
        ("accept", "text/weird"),
        ("content-type", "application/x-test"),
        ("x-request-id", "req-123"),
        ("content-length", "5"),
    ]
    names = {name for name, _ in seen["headers"]}
    assert not names & {"user-agent", "accept-encoding", "cookie", "via", "x-forwarded-for"}
    assert seen["body_size"] == 5


def test_hop_by_hop_and_connection_listed_headers_are_dropped(sidecar: Sidecar) -> None:
    request = (
        f"GET /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
        "Connection: close, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n"
    ).encode()
    status, _, body = split_response(raw_request(sidecar.port, request))
    assert status == 200
    names = [name for name, _ in json.loads(body)["headers"]]
    assert "x-kept" in names
    for dropped in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert dropped not in names


def test_request_id_is_generated_when_the_app_sends_none(sidecar: Sidecar) -> None:
    seen = httpx.get(f"{sidecar.url}/up/echo").json()
    ids = [value for name, value in seen["headers"] if name == "x-request-id"]
    assert len(ids) == 1 and len(ids[0]) == 32


def test_no_cookie_jar_between_calls(sidecar: Sidecar) -> None:
    first = httpx.get(f"{sidecar.url}/up/cookies")
    assert first.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/", "c=3; Path=/"]
    seen = httpx.get(f"{sidecar.url}/up/echo").json()
    assert "cookie" not in {name for name, _ in seen["headers"]}


def test_repeated_response_headers_keep_values_and_order(sidecar: Sidecar) -> None:
    status, headers, _ = split_response(raw_request(
        sidecar.port, f"GET /up/cookies HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\nConnection: close\r\n\r\n".encode()))
    assert status == 200
    relevant = [(k, v) for k, v in headers if k in ("set-cookie", "x-multi")]
    assert relevant == [("set-cookie", "a=1; Path=/"), ("x-multi", "one"), ("set-cookie", "b=2; Path=/"),
                        ("x-multi", "two"), ("set-cookie", "c=3; Path=/")]


def test_redirect_goes_back_to_the_app_unfollowed(sidecar: Sidecar) -> None:
    response = httpx.get(f"{sidecar.url}/up/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "https://elsewhere.example/"


def test_gzip_body_passes_byte_exact(sidecar: Sidecar) -> None:
    with httpx.stream("GET", f"{sidecar.url}/up/gzip") as response:
        raw = b"".join(response.iter_raw())
        assert response.headers["content-encoding"] == "gzip"
    assert raw == GZIP_PAYLOAD
    assert gzip.decompress(raw).startswith(b"hello gzip")


@pytest.mark.parametrize("path", ["bytes", "chunked"])
def test_random_mebibyte_arrives_byte_exact(sidecar: Sidecar, path: str) -> None:
    with httpx.stream("GET", f"{sidecar.url}/up/{path}?n=1048576&seed=42") as response:
        body = b"".join(response.iter_raw())
        framing = response.headers.get("content-length") or response.headers.get("transfer-encoding")
    assert body == random_bytes(1048576, 42)
    assert framing == ("1048576" if path == "bytes" else "chunked")


def test_body_delimited_by_connection_close_arrives_whole(sidecar: Sidecar) -> None:
    response = httpx.get(f"{sidecar.url}/up/close")
    assert response.content == random_bytes(5000, 7)


def test_head_204_304_have_no_body(sidecar: Sidecar) -> None:
    head = raw_request(sidecar.port, f"HEAD /up/head HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
                                     "Connection: close\r\n\r\n".encode())
    status, headers, body = split_response(head)
    assert (status, body) == (200, b"")
    assert ("content-length", "12345") in headers
    for code in (204, 304):
        raw = raw_request(sidecar.port, f"GET /up/status/{code} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
                                        "Connection: close\r\n\r\n".encode())
        status, headers, body = split_response(raw)
        assert (status, body) == (code, b"")
        assert "transfer-encoding" not in dict(headers)


def test_chunked_upload_streams_upstream(sidecar: Sidecar) -> None:
    data = random_bytes(3 * 1024 * 1024 + 17, 9)

    def chunks():  # no length: the sidecar must send it chunked
        for offset in range(0, len(data), 65536):
            yield data[offset : offset + 65536]

    seen = httpx.post(f"{sidecar.url}/up/echo", content=chunks()).json()
    import hashlib

    assert seen["body_size"] == len(data)
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert ("transfer-encoding", "chunked") in [tuple(h) for h in seen["headers"]]


def test_upload_of_200_mib_keeps_rss_within_32_mib(sidecar: Sidecar) -> None:
    block = random_bytes(1024 * 1024, 3)
    total = 200

    def body():
        for _ in range(total):
            yield block

    before = sidecar.rss_kib()
    seen = httpx.post(f"{sidecar.url}/up/echo", content=body(),
                      headers={"content-length": str(total * len(block))}, timeout=60).json()
    assert seen["body_size"] == total * len(block)
    peak = sidecar.rss_kib("VmHWM")
    assert peak - before <= 32 * 1024, f"RSS grew by {(peak - before) / 1024:.1f} MiB"


def test_sidecar_adds_no_server_or_date_header(sidecar: Sidecar) -> None:
    status, headers, _ = split_response(raw_request(
        sidecar.port, f"GET /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\nConnection: close\r\n\r\n".encode()))
    assert status == 200
    # The upstream sent exactly these two; uvicorn must add neither `server` nor `date`.
    assert sorted(name for name, _ in headers if name not in ("connection",)) == ["content-length", "content-type"]


def test_x_forwarded_headers_from_the_app_pass_through_untouched(sidecar: Sidecar) -> None:
    seen = httpx.get(f"{sidecar.url}/up/echo",
                     headers={"x-forwarded-for": "203.0.113.9", "x-forwarded-proto": "https"}).json()
    headers = [tuple(h) for h in seen["headers"]]
    assert ("x-forwarded-for", "203.0.113.9") in headers
    assert ("x-forwarded-proto", "https") in headers


def test_a_response_head_reaches_the_app_before_its_body_starts(sidecar: Sidecar, upstream: Upstream) -> None:
    # The sidecar writes a head together with a body that is already there; a head whose
    # body has not started (an event stream between events) must still go out at once.
    with httpx.Client(timeout=httpx.Timeout(5.0)) as client, client.stream(
            "GET", f"{sidecar.url}/up/head-then-stall") as response:
        assert response.status_code == 200 and response.headers["content-length"] == "100"
        seen = next(s for s in reversed(upstream.requests) if s.target == "/head-then-stall")
        assert not seen.peer_closed  # the upstream is still holding the body back
    wait_until(lambda: seen.peer_closed, timeout=5, message="the sidecar closes the abandoned upstream request")
