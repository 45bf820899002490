"""The SSRF table of test_ssrf.py spelled as CONNECT authorities, sealed: each refused, none connects.

Same catching listeners on [::]:80 and [::]:443 of every target address; the sidecar lets
CONNECT reach ports 80, 443 and its own two ports, so each vector meets the host and address
rules rather than the port rule. Each vector expects the status, `x-egress-error` and logged
reason its forward-proxy spelling gets, and ZERO connections caught. Positive controls (a
public name, a public literal) prove the catchers see what a tunnel does reach.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests.conftest import Sidecar, base_config, start_sidecar
from tests.e2e.connect_support import connect, read_to_eof
from tests.sealed.catchers import Catchers
from tests.sealed.dns import DNSServer
from tests.sealed.test_ssrf import ADMIN, LISTEN, SIDECAR_CONFIG, VECTORS, Vector, error_lines
from tests.upstream import wait_until


def authority(vector: Vector, sidecar: Sidecar) -> str:
    """`http://host[:port]/path` -> `host:port` (443 when the URL names no port)."""
    url = vector.url.replace(LISTEN, str(sidecar.port)).replace(ADMIN, str(sidecar.admin_port))
    host_port = url.split("/")[2]
    if host_port.startswith("["):
        host, _, rest = host_port.partition("]")
        return f"{host}]{rest}" if rest.startswith(":") else f"{host}]:443"
    return host_port if ":" in host_port else f"{host_port}:443"


@pytest.fixture(scope="module")
def sidecar(system_resolver: None, ca_file: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    config: dict[str, Any] = base_config(ca_file, **SIDECAR_CONFIG)
    config["policy"] = {**config["policy"],
                        "connect_ports": [80, 443, config["listen"]["port"], config["admin"]["port"]]}
    started = start_sidecar(tmp_path_factory.mktemp("connect-ssrf"), config)
    yield started
    started.terminate()


def assert_refused(sidecar: Sidecar, caught: Catchers, target: str, status: int, kind: str,
                   reason: str | None) -> None:
    before = len(error_lines(sidecar))
    sock, got, headers, rest = connect(sidecar.port, target)
    body = rest + read_to_eof(sock)
    sock.close()
    assert (got, headers.get("x-egress-error")) == (status, kind), body
    assert body.startswith(f"egress-sidecar: {kind}:".encode()) and body.count(b"\n") == 1
    lines = wait_until(lambda: error_lines(sidecar)[before:] or None, 5, message="error log line")
    assert len(error_lines(sidecar)) == before + 1, lines
    assert (lines[0]["kind"], lines[0].get("reason"), lines[0]["method"]) == (kind, reason, "CONNECT")
    caught.barrier()
    assert caught.connections() == []


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_ssrf_vector_as_connect_authority_is_refused_and_nothing_connects(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, vector: Vector
) -> None:
    assert_refused(sidecar, caught, authority(vector, sidecar), vector.status, vector.kind, vector.reason)


def test_a_port_outside_connect_ports_is_refused_before_resolving(sidecar: Sidecar, caught: Catchers,
                                                                   dns: DNSServer) -> None:
    assert_refused(sidecar, caught, "public.test:8443", 403, "denied_port", "port")
    assert dns.queries == []


def tls_through(sidecar: Sidecar, ca: trustme.CA, target: str, server_hostname: str) -> bytes:
    sock, status, _, _ = connect(sidecar.port, target)
    assert status == 200
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n".encode())
        return read_to_eof(tls).partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    ("target", "name", "address"),
    [("public.test:443", "public.test", "1.1.1.1"), ("public.static.test:443", "public.static.test", "1.1.1.1")],
    ids=["dns-name", "static-name"],
)
def test_positive_control_a_public_destination_is_tunnelled(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, ca: trustme.CA, target: str, name: str, address: str
) -> None:
    assert tls_through(sidecar, ca, target, name) == f"caught {address}:443".encode()
    caught.barrier()
    assert [(c.address, c.port, c.sni) for c in caught.connections()] == [(address, 443, name)]


def test_sni_naming_another_host_never_reaches_it(sidecar: Sidecar, caught: Catchers, dns: DNSServer,
                                                   ca: trustme.CA) -> None:
    # Domain fronting: the allowed name in the CONNECT, another in the TLS handshake.
    sock, status, _, _ = connect(sidecar.port, "public.test:443")
    assert status == 200
    context = ssl.create_default_context()
    ca.configure_trust(context)
    # The handshake fails: the sidecar closes the tunnel on reading the ClientHello.
    with pytest.raises((ssl.SSLError, OSError)), context.wrap_socket(sock, server_hostname="x.public.test"):
        pass
    caught.barrier()
    # The upstream connection was made (connect before 200) but not one byte reached it.
    assert [(c.address, c.sni, c.request_head) for c in caught.connections()] in ([], [("1.1.1.1", None, b"")])
    sidecar.wait_log(lambda e: e.get("event") == "tunnel" and e.get("outcome") == "sni_mismatch")


def test_dns_rebinding_cannot_reach_the_private_address_through_a_tunnel(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, ca: trustme.CA
) -> None:
    assert tls_through(sidecar, ca, "rebind.test:443", "rebind.test") == b"caught 1.1.1.1:443"
    caught.barrier()
    assert [c.address for c in caught.connections()] == ["1.1.1.1"]
    caught.clear()
    assert_refused(sidecar, caught, "rebind.test:443", 403, "denied_ip", "private")


def test_plaintext_is_refused_without_a_byte_upstream(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer
) -> None:
    sock, status, _, _ = connect(sidecar.port, "public.test:80")
    assert status == 200
    sock.sendall(b"GET / HTTP/1.1\r\nHost: public.test\r\n\r\n")
    assert read_to_eof(sock) == b""
    sock.close()
    caught.barrier()
    assert all(c.request_head == b"" for c in caught.connections())
    sidecar.wait_log(lambda e: e.get("event") == "tunnel" and e.get("outcome") == "not_tls")
