"""CONNECT tunnels under the policy, on loopback: every refusal forwards nothing.

The upstream is a plain TCP listener that records every byte it gets, so "nothing forwarded"
is checked where it matters; the client speaks raw CONNECT and sends real ClientHellos.
(The SSRF table as CONNECT authorities runs sealed: tests/sealed/test_connect_ssrf.py.)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar
from tests.e2e.connect_support import TcpUpstream, client_hello, connect, read_head, read_to_eof
from tests.upstream import wait_until


@pytest.fixture
def recorder() -> Iterator[TcpUpstream]:
    upstream = TcpUpstream("record")
    yield upstream
    upstream.stop()


def tunnel_config(port: int, **policy: Any) -> dict[str, Any]:
    return {"policy": {"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [port], **policy}}


@pytest.fixture
def sidecar_for(make_sidecar: Callable[..., Sidecar], recorder: TcpUpstream) -> Sidecar:
    return make_sidecar(**tunnel_config(recorder.port), limits={"header_timeout": "1s"})


def tunnel_line(sidecar: Sidecar, outcome: str | None = None) -> dict[str, Any]:
    return sidecar.wait_log(lambda e: e.get("event") == "tunnel" and (outcome is None or e["outcome"] == outcome))


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    text = httpx.get(f"{sidecar.admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            got = dict(part.split("=", 1) for part in line[line.find("{") + 1 : line.rfind("}")].split(",")
                       if "=" in part) if "{" in line else {}
            if all(got.get(k) == f'"{v}"' for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_hello_then_bytes_reach_the_upstream_and_half_close_passes_both_ways(
    sidecar_for: Sidecar, recorder: TcpUpstream
) -> None:
    sock, status, _, rest = connect(sidecar_for.port, f"localhost:{recorder.port}")
    assert (status, rest) == (200, b"")
    hello = client_hello("localhost")
    # The hello in small pieces, as a slow client or a fragmenting middlebox would send it.
    for offset in range(0, len(hello), 50):
        sock.sendall(hello[offset : offset + 50])
    sock.sendall(b"after the hello")
    sock.shutdown(socket.SHUT_WR)  # our FIN must reach the upstream, its answer must come back
    sent = len(hello) + len(b"after the hello")
    assert read_to_eof(sock) == b"got %d" % sent
    assert recorder.received == hello + b"after the hello"
    line = tunnel_line(sidecar_for, "closed")
    assert (line["bytes_in"], line["bytes_out"], line["sni"]) == (sent, len(b"got %d" % sent), "localhost")


@pytest.mark.parametrize(
    ("first", "outcome"),
    [
        (client_hello("evil.example"), "sni_mismatch"),
        (client_hello(None), "no_sni"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "not_tls"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad_hello"),
    ],
    ids=["sni-mismatch", "no-sni-for-a-name", "plaintext", "server-hello"],
)
def test_first_bytes_that_fail_the_check_are_refused_and_nothing_is_forwarded(
    sidecar_for: Sidecar, recorder: TcpUpstream, first: bytes, outcome: str
) -> None:
    sock, status, _, _ = connect(sidecar_for.port, f"localhost:{recorder.port}")
    assert status == 200  # connected first, then checked
    sock.sendall(first)
    assert read_to_eof(sock) == b""
    sock.close()
    line = tunnel_line(sidecar_for, outcome)
    assert line["level"] == "warning" and line["reason"] == outcome and line["bytes_in"] == 0
    wait_until(lambda: recorder.conns and recorder.conns[0].closed, 5, message="upstream connection closed")
    assert recorder.received == b""
    if outcome != "bad_hello":
        assert metric(sidecar_for, "egress_denied_total", reason=outcome) == 1
    assert metric(sidecar_for, "egress_tunnels_total", outcome=outcome) == 1


def test_sni_differing_only_in_case_and_trailing_dot_is_the_same_host(sidecar_for: Sidecar,
                                                                      recorder: TcpUpstream) -> None:
    sock, status, _, _ = connect(sidecar_for.port, f"LocalHost.:{recorder.port}")
    assert status == 200
    hello = client_hello("LOCALHOST")
    sock.sendall(hello)
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b"got %d" % len(hello)


def test_no_sni_is_accepted_for_an_ip_literal_authority(sidecar_for: Sidecar, recorder: TcpUpstream) -> None:
    sock, status, _, _ = connect(sidecar_for.port, f"127.0.0.1:{recorder.port}")
    assert status == 200
    hello = client_hello(None)
    sock.sendall(hello)
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b"got %d" % len(hello)
    assert recorder.received == hello


def test_an_ip_literal_authority_with_a_server_name_is_a_mismatch(sidecar_for: Sidecar,
                                                                    recorder: TcpUpstream) -> None:
    # The address was checked, the name in the ClientHello was not: fronting by address.
    sock, status, _, _ = connect(sidecar_for.port, f"127.0.0.1:{recorder.port}")
    assert status == 200
    sock.sendall(client_hello("localhost"))
    assert read_to_eof(sock) == b""
    tunnel_line(sidecar_for, "sni_mismatch")
    assert recorder.received == b""


def test_plaintext_passes_when_connect_plaintext_is_on(make_sidecar: Callable[..., Sidecar],
                                                       recorder: TcpUpstream) -> None:
    sidecar = make_sidecar(**tunnel_config(recorder.port, connect_plaintext=True))
    sock, status, _, _ = connect(sidecar.port, f"localhost:{recorder.port}")
    assert status == 200
    sock.sendall(b"EHLO plaintext\r\n")
    sock.shutdown(socket.SHUT_WR)
    assert read_to_eof(sock) == b"got 16"
    assert recorder.received == b"EHLO plaintext\r\n"


def test_a_server_that_speaks_first_is_heard_only_when_plaintext_is_on(make_sidecar: Callable[..., Sidecar]) -> None:
    banner = TcpUpstream("banner")
    try:
        plain = make_sidecar(**tunnel_config(banner.port, connect_plaintext=True))
        sock, status, _, rest = connect(plain.port, f"localhost:{banner.port}")
        assert status == 200
        greeting = rest
        while not greeting.endswith(b"\r\n"):
            greeting += sock.recv(100)
        assert greeting == b"220 ready\r\n"  # before the client said anything
        sock.sendall(b"EHLO me\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"got 9"
        # TLS only (the default): the greeting is held, the client's silence ends the tunnel.
        strict = make_sidecar(**tunnel_config(banner.port), limits={"header_timeout": "1s"})
        sock, status, _, rest = connect(strict.port, f"localhost:{banner.port}")
        assert status == 200
        assert rest + read_to_eof(sock) == b""
        tunnel_line(strict, "client_timeout")
    finally:
        banner.stop()


def test_a_client_that_never_speaks_is_closed_after_the_header_timeout(sidecar_for: Sidecar,
                                                                       recorder: TcpUpstream) -> None:
    sock, status, _, _ = connect(sidecar_for.port, f"localhost:{recorder.port}")
    assert status == 200
    started = time.monotonic()
    assert read_to_eof(sock) == b""
    assert 0.9 < time.monotonic() - started < 5
    assert tunnel_line(sidecar_for, "client_timeout")["bytes_in"] == 0
    assert recorder.received == b""


def test_port_outside_connect_ports_is_denied_before_connecting(sidecar_for: Sidecar, recorder: TcpUpstream) -> None:
    other = TcpUpstream("record")
    try:
        sock, status, headers, body = connect(sidecar_for.port, f"localhost:{other.port}")
        assert (status, headers["x-egress-error"]) == (403, "denied_port")
        assert body.startswith(b"egress-sidecar: denied_port:") or read_to_eof(sock).startswith(
            b"egress-sidecar: denied_port:")
        line = sidecar_for.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "denied_port")
        assert (line["reason"], line["method"]) == ("port", "CONNECT")
        assert other.conns == []
        assert metric(sidecar_for, "egress_denied_total", reason="port") == 1
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("authority", "status", "kind"),
    [
        ("blocked.test:{port}", 403, "denied_host"),
        ("127.0.0.1:{sidecar}", 508, "loop"),
        ("localhost:{admin}", 508, "loop"),
        ("no-port.test", 400, "bad_request"),
        ("user@localhost:{port}", 400, "bad_request"),
    ],
    ids=["deny-host", "own-listener", "own-admin", "no-port", "userinfo"],
)
def test_refusals_before_connecting_are_error_answers(
    make_sidecar: Callable[..., Sidecar], recorder: TcpUpstream, authority: str, status: int, kind: str
) -> None:
    sidecar = make_sidecar(**tunnel_config(recorder.port, deny_hosts=["blocked.test"]))
    authority = authority.format(port=recorder.port, sidecar=sidecar.port, admin=sidecar.admin_port)
    _, got, headers, _ = connect(sidecar.port, authority)
    assert (got, headers["x-egress-error"]) == (status, kind)
    sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == kind)
    assert recorder.conns == []


def test_failed_connect_is_the_same_502_as_forwarded_requests(make_sidecar: Callable[..., Sidecar]) -> None:
    with socket.socket() as closed:  # bound, never listening: connecting is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        sidecar = make_sidecar(**tunnel_config(port))
        _, status, headers, _ = connect(sidecar.port, f"localhost:{port}")
    assert (status, headers["x-egress-error"]) == (502, "connect_error")


def test_idle_tunnel_is_closed_after_tunnel_idle(make_sidecar: Callable[..., Sidecar], recorder: TcpUpstream) -> None:
    sidecar = make_sidecar(**tunnel_config(recorder.port), timeouts={"tunnel_idle": "1s"})
    sock, status, _, _ = connect(sidecar.port, f"localhost:{recorder.port}")
    assert status == 200
    sock.sendall(client_hello("localhost"))
    started = time.monotonic()
    assert read_to_eof(sock) == b""
    assert 0.9 < time.monotonic() - started < 3
    tunnel_line(sidecar, "idle_timeout")


def test_max_tunnels_answers_503_overloaded_and_frees_the_slot(make_sidecar: Callable[..., Sidecar],
                                                               recorder: TcpUpstream) -> None:
    sidecar = make_sidecar(**tunnel_config(recorder.port), limits={"max_tunnels": 2})
    opened = [connect(sidecar.port, f"localhost:{recorder.port}") for _ in range(2)]
    assert [o[1] for o in opened] == [200, 200]
    assert metric(sidecar, "egress_tunnels_active") == 2
    _, status, headers, _ = connect(sidecar.port, f"localhost:{recorder.port}")
    assert (status, headers["x-egress-error"], headers["retry-after"]) == (503, "overloaded", "1")
    assert len(recorder.conns) == 2
    opened[0][0].close()
    wait_until(lambda: metric(sidecar, "egress_tunnels_active") == 1, 5, message="slot freed")
    _, status, _, _ = connect(sidecar.port, f"localhost:{recorder.port}")
    assert status == 200


def test_tunnel_metrics_count_bytes_and_outcomes(sidecar_for: Sidecar, recorder: TcpUpstream) -> None:
    sock, _, _, _ = connect(sidecar_for.port, f"localhost:{recorder.port}")
    hello = client_hello("localhost")
    sock.sendall(hello)
    sock.shutdown(socket.SHUT_WR)
    read_to_eof(sock)
    tunnel_line(sidecar_for, "closed")
    upstream = f"localhost:{recorder.port}"
    assert metric(sidecar_for, "egress_tunnels_total", upstream=upstream, outcome="closed") == 1
    assert metric(sidecar_for, "egress_tunnel_bytes_total", upstream=upstream, direction="up") == len(hello)
    assert metric(sidecar_for, "egress_tunnel_bytes_total", upstream=upstream, direction="down") == len(
        b"got %d" % len(hello))
    assert metric(sidecar_for, "egress_tunnel_duration_seconds_count") == 1
    assert metric(sidecar_for, "egress_tunnels_active") == 0


def test_connect_head_and_hello_in_one_write_work(sidecar_for: Sidecar, recorder: TcpUpstream) -> None:
    # A client may send its ClientHello without waiting for the 200 (the bytes after the head).
    hello = client_hello("localhost")
    sock = socket.create_connection(("127.0.0.1", sidecar_for.port), timeout=10)
    sock.sendall(f"CONNECT localhost:{recorder.port} HTTP/1.1\r\n\r\n".encode() + hello)
    status, _, rest = read_head(sock)
    sock.shutdown(socket.SHUT_WR)
    assert status == 200
    assert rest + read_to_eof(sock) == b"got %d" % len(hello)


def test_connect_under_the_h11_parser_is_501_unsupported(make_sidecar: Callable[..., Sidecar],
                                                         recorder: TcpUpstream) -> None:
    sidecar = make_sidecar(**tunnel_config(recorder.port), listen={"http": "h11"})
    _, status, headers, _ = connect(sidecar.port, f"localhost:{recorder.port}")
    assert (status, headers["x-egress-error"]) == (501, "unsupported")
    assert recorder.conns == []
