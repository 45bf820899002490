"""Per-route TLS against real upstreams: mTLS client certificates, per-route CA, verification."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import Sidecar, server_context
from tests.upstream import Upstream, UpstreamServer, wait_until


class MTLSUpstream:
    """An upstream that requires a client certificate, on the stdlib's blocking ssl module.

    Like OpenSSL-based servers it sends the TLS alert (`certificate required`) when the client
    presents none; asyncio's SSL server just closes, which a client cannot tell from a reset.
    It answers every request with the names in the client certificate it saw.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.subjects: list[str] = []
        self.handshake_failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        # wrap_socket closes the socket when the handshake fails; a duplicate descriptor keeps
        # it open so what the client already sent can be read, and closing then sends FIN,
        # not a RST that would overtake the alert.
        raw = conn.dup()
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_failures.append(str(exc))
            try:
                while raw.recv(65536):
                    pass
            except OSError:
                pass
            raw.close()
            return
        raw.close()
        with tls:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                head += chunk
            peer = tls.getpeercert() or {}
            subject = ",".join(value for _kind, value in peer.get("subjectAltName", ()))
            self.subjects.append(subject)
            body = json.dumps({"client_subject": subject}).encode()
            tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def mtls_upstream(ca: trustme.CA) -> Iterator[MTLSUpstream]:
    """A TLS upstream that requires a client certificate issued by the test CA."""
    context = server_context(ca, "localhost")
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    server = MTLSUpstream(context)
    yield server
    server.stop()


@pytest.fixture
def client_cert(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    issued = ca.issue_cert("egress-sidecar.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    for blob in issued.cert_chain_pems:
        with open(cert, "ab") as out:
            out.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


@pytest.fixture
def foreign_upstream() -> Iterator[Upstream]:
    """A TLS upstream whose certificate comes from a CA the sidecar does not trust by default."""
    server = UpstreamServer(server_context(trustme.CA(), "localhost"))
    yield server.start()
    server.stop()


def get(sidecar: Sidecar, path: str) -> tuple[int, dict[str, str], bytes]:
    with httpx.Client(trust_env=False) as client:  # origin-form: a route
        response = client.get(f"{sidecar.url}{path}")
    return response.status_code, dict(response.headers), response.content


def test_mtls_route_with_client_certificate_succeeds(
    make_sidecar: Callable[..., Sidecar], mtls_upstream: MTLSUpstream, client_cert: tuple[str, str], ca_file: str
) -> None:
    cert, key = client_cert
    sidecar = make_sidecar(routes=[{
        "name": "mtls", "prefix": "/mtls", "upstream": f"https://localhost:{mtls_upstream.port}",
        "tls": {"ca_file": ca_file, "cert_file": cert, "key_file": key},
    }])
    status, _headers, body = get(sidecar, "/mtls/echo")
    assert status == 200, body
    assert json.loads(body) == {"client_subject": "egress-sidecar.test"}


def test_mtls_route_without_client_certificate_is_a_tls_error(
    make_sidecar: Callable[..., Sidecar], mtls_upstream: MTLSUpstream
) -> None:
    sidecar = make_sidecar(routes=[{"name": "mtls", "prefix": "/mtls", "upstream": f"https://localhost:{mtls_upstream.port}"}])
    status, headers, body = get(sidecar, "/mtls/echo")
    assert (status, headers.get("x-egress-error")) == (502, "tls_error"), body
    # The upstream's thread records its side of the failed handshake a moment after the
    # sidecar has seen the alert: wait for it rather than race it.
    wait_until(lambda: mtls_upstream.handshake_failures, timeout=5, message="upstream saw the failed handshake")
    assert mtls_upstream.subjects == []
    line = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "tls_error")
    assert "CERTIFICATE_REQUIRED" in line["detail"]


def test_untrusted_upstream_certificate_is_refused(make_sidecar: Callable[..., Sidecar], foreign_upstream: Upstream) -> None:
    sidecar = make_sidecar(routes=[{"name": "f", "prefix": "/f", "upstream": f"https://localhost:{foreign_upstream.port}"}])
    status, headers, _body = get(sidecar, "/f/echo")
    assert (status, headers.get("x-egress-error")) == (502, "tls_error")
    assert foreign_upstream.requests == []


def test_route_ca_file_trusts_its_own_upstream(
    make_sidecar: Callable[..., Sidecar], tmp_path: Path
) -> None:
    other_ca = trustme.CA()
    server = UpstreamServer(server_context(other_ca, "localhost"))
    upstream = server.start()
    try:
        other_ca_file = tmp_path / "other-ca.pem"
        other_ca.cert_pem.write_to_path(str(other_ca_file))
        sidecar = make_sidecar(routes=[{
            "name": "own-ca", "prefix": "/own", "upstream": f"https://localhost:{upstream.port}",
            "tls": {"ca_file": str(other_ca_file)},
        }])
        status, _headers, body = get(sidecar, "/own/echo")
        assert status == 200, body
    finally:
        server.stop()


def test_insecure_skip_verify_only_on_the_route_that_says_so_and_warns(
    make_sidecar: Callable[..., Sidecar], foreign_upstream: Upstream
) -> None:
    base = f"https://localhost:{foreign_upstream.port}"
    sidecar = make_sidecar(routes=[
        {"name": "lax", "prefix": "/lax", "upstream": base, "tls": {"insecure_skip_verify": True}},
        {"name": "strict", "prefix": "/strict", "upstream": base},
    ])
    warning = sidecar.wait_log(lambda e: e.get("level") == "warning" and "lax" in str(e.get("event")))
    assert "verification is OFF" in str(warning["event"])
    assert get(sidecar, "/lax/echo")[0] == 200
    status, headers, _body = get(sidecar, "/strict/echo")
    assert (status, headers.get("x-egress-error")) == (502, "tls_error")
