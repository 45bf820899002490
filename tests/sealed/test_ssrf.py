"""SSRF vectors through the real sidecar, in the sealed namespace: each denied, none connects.

Every target address is on lo with a catching listener on [::]:80 and [::]:443, so a
vector the policy let through would be recorded (and answered); each vector expects 403,
the right `x-egress-error`, the named reason in the log line, and ZERO connections. Positive
controls (a public name, a public literal, an allow_cidrs range) prove the catchers see
what does get through.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Sidecar, base_config, start_sidecar
from tests.e2e.test_transparency import raw_request, split_response
from tests.sealed.catchers import Catchers
from tests.sealed.dns import DNSServer
from tests.servers.upstream import wait_until

LISTEN = "{listen}"  # replaced by the sidecar's data port
ADMIN = "{admin}"  # replaced by the sidecar's admin port


@dataclass(frozen=True)
class Vector:
    id: str
    url: str  # what the app asks for in forward-proxy form (absolute URI; Host header to match)
    kind: str  # expected x-egress-error
    reason: str | None  # expected denial reason in the log line (None: not a policy denial)
    status: int = 403


VECTORS = [
    # Cloud metadata, every spelling of 169.254.169.254.
    Vector("metadata-dotted", "http://169.254.169.254/latest/meta-data/iam/", "denied_ip", "metadata"),
    Vector("metadata-port-80", "http://169.254.169.254:80/latest/", "denied_ip", "metadata"),
    Vector("metadata-port-443", "http://169.254.169.254:443/", "denied_ip", "metadata"),
    Vector("metadata-decimal", "http://2852039166/", "denied_ip", "metadata"),
    Vector("metadata-hex-dotted", "http://0xa9.0xfe.0xa9.0xfe/", "denied_ip", "metadata"),
    Vector("metadata-hex", "http://0xa9fea9fe/", "denied_ip", "metadata"),
    Vector("metadata-octal", "http://0251.0376.0251.0376/", "denied_ip", "metadata"),
    Vector("metadata-short", "http://169.254.43518/", "denied_ip", "metadata"),
    Vector("metadata-trailing-dot", "http://169.254.169.254./", "denied_ip", "metadata"),
    Vector("metadata-v4-mapped", "http://[::ffff:169.254.169.254]/", "denied_ip", "metadata"),
    Vector("metadata-v4-mapped-hex", "http://[::ffff:a9fe:a9fe]/", "denied_ip", "metadata"),
    Vector("metadata-nat64", "http://[64:ff9b::a9fe:a9fe]/", "denied_ip", "metadata"),
    Vector("metadata-6to4", "http://[2002:a9fe:a9fe::1]/", "denied_ip", "metadata"),
    Vector("metadata-aws-ipv6", "http://[fd00:ec2::254]/latest/", "denied_ip", "metadata"),
    Vector("metadata-ecs", "http://169.254.170.2/v2/credentials", "denied_ip", "metadata"),
    Vector("metadata-alibaba", "http://100.100.100.200/latest/meta-data/", "denied_ip", "metadata"),
    # Private, link-local, CGNAT, reserved ranges.
    Vector("rfc1918-10", "http://10.0.0.1/", "denied_ip", "private"),
    Vector("rfc1918-172", "http://172.16.0.1/", "denied_ip", "private"),
    Vector("rfc1918-192", "http://192.168.1.1/admin", "denied_ip", "private"),
    Vector("rfc1918-10-octal", "http://012.0.0.01/", "denied_ip", "private"),
    Vector("ula", "http://[fc00::1]/", "denied_ip", "private"),
    Vector("link-local", "http://169.254.10.10/", "denied_ip", "link_local"),
    Vector("cgnat", "http://100.64.0.1/", "denied_ip", "cgnat"),
    Vector("benchmark", "http://198.18.0.1/", "denied_ip", "reserved"),
    Vector("test-net", "http://192.0.2.1/", "denied_ip", "reserved"),
    Vector("documentation-v6", "http://[2001:db8::1]/", "denied_ip", "reserved"),
    # Not addable to lo as unicast targets, so no catcher: the namespace still keeps them in.
    Vector("link-local-v6", "http://[fe80::1]/", "denied_ip", "link_local"),
    Vector("multicast", "http://224.0.0.1/", "denied_ip", "multicast"),
    Vector("multicast-v6", "http://[ff02::1]/", "denied_ip", "multicast"),
    Vector("broadcast", "http://255.255.255.255/", "denied_ip", "reserved"),
    Vector("teredo-private-server", "http://[2001:0:a00:1::1]/", "denied_ip", "private"),
    # Loopback and "this host".
    Vector("loopback", "http://127.0.0.1/", "denied_ip", "loopback"),
    Vector("loopback-short", "http://127.1/", "denied_ip", "loopback"),
    Vector("loopback-decimal", "http://2130706433/", "denied_ip", "loopback"),
    Vector("loopback-v6", "http://[::1]/", "denied_ip", "loopback"),
    Vector("loopback-v4-mapped", "http://[::ffff:127.0.0.1]/", "denied_ip", "loopback"),
    Vector("loopback-v4-compat", "http://[::127.0.0.1]/", "denied_ip", "loopback"),
    Vector("unspecified", "http://0.0.0.0/", "denied_ip", "unspecified"),
    Vector("unspecified-zero", "http://0/", "denied_ip", "unspecified"),
    Vector("unspecified-v6", "http://[::]/", "denied_ip", "unspecified"),
    Vector("localhost-name", "http://localhost/", "denied_ip", "loopback"),
    # Names that resolve to denied addresses: static `resolve:` map (checked before connect) ...
    Vector("static-metadata", "http://meta.static.test/", "denied_ip", "metadata"),
    Vector("static-public-and-private", "http://mixed.static.test/", "denied_ip", "private"),
    Vector("static-v6-metadata", "http://v6meta.static.test/", "denied_ip", "metadata"),
    # ... and the system resolver (sealed DNS server; checked on the resolved address at connect).
    Vector("dns-metadata", "http://metadata.test/", "denied_ip", "metadata"),
    Vector("dns-public-and-private", "http://mixed.test/", "denied_ip", "private"),
    Vector("dns-v6-metadata", "http://v6-metadata.test/", "denied_ip", "metadata"),
    Vector("dns-v4-mapped-metadata", "http://mapped.test/", "denied_ip", "metadata"),
    Vector("dns-private", "http://intranet.test/", "denied_ip", "private"),
    # Host rules.
    Vector("deny-host-wildcard", "http://x.blocked.test/", "denied_host", "host_denied"),
    Vector("deny-host-case-and-dot", "http://API.Blocked.Test./", "denied_host", "host_denied"),
    Vector("invalid-numeric-host", "http://1.2.3.4.5/", "denied_host", "invalid_host"),
    # The sidecar's own listeners under spellings routing does not recognise as itself.
    Vector("listener-decimal", f"http://2130706433:{LISTEN}/", "denied_ip", "listener"),
    Vector("listener-hex", f"http://0x7f.1:{LISTEN}/", "denied_ip", "listener"),
    Vector("listener-v4-mapped-admin", f"http://[::ffff:7f00:1]:{ADMIN}/config", "denied_ip", "listener"),
    Vector("listener-unspecified-v6", f"http://[::]:{ADMIN}/config", "loop", None, 508),  # routing knows [::]
    Vector("listener-unspecified-v6-long", f"http://[0:0::0]:{ADMIN}/config", "denied_ip", "listener"),
    Vector("listener-static-name", f"http://self.static.test:{LISTEN}/", "denied_ip", "listener"),
    Vector("listener-dns-name", f"http://localhost:{ADMIN}/config", "loop", None, 508),
]


SIDECAR_CONFIG: dict[str, Any] = {
    "policy": {"default": "allow-public", "deny_hosts": ["*.blocked.test"], "allow_cidrs": []},
    "resolve": {
        "meta.static.test": "169.254.169.254",
        "mixed.static.test": ["1.1.1.1", "10.0.0.1"],
        "v6meta.static.test": "fd00:ec2::254",
        "self.static.test": "127.0.0.1",
        "public.static.test": "1.1.1.1",
    },
    "routes": [
        {"name": "meta", "prefix": "/meta", "upstream": "http://169.254.169.254/latest"},
        {"name": "internal", "prefix": "/internal", "upstream": "https://intranet.test"},
        {"name": "rebind", "prefix": "/rebind", "upstream": "https://rebind.test"},
        {"name": "public", "prefix": "/public", "upstream": "https://public.test"},
    ],
}


@pytest.fixture(scope="module", params=["httptools", "h11"])
def sidecar(
    request: pytest.FixtureRequest, system_resolver: None, ca_file: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    """The sidecar under both request parsers: routing reads the destination from `Host`
    (httptools) or from the absolute URI (h11), and the policy must hold either way."""
    config = base_config(ca_file, **SIDECAR_CONFIG)
    config["listen"]["http"] = request.param
    started = start_sidecar(tmp_path_factory.mktemp("ssrf"), config)
    yield started
    started.terminate()


def forward(sidecar: Sidecar, url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A forward-proxy request for `url`; the Host header matches it unless `host` is given."""
    url = url.replace(LISTEN, str(sidecar.port)).replace(ADMIN, str(sidecar.admin_port))
    host = host or url.split("/")[2]
    raw = raw_request(sidecar.port, f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    status, headers, body = split_response(raw)
    return status, dict(headers), body


def via_route(sidecar: Sidecar, path: str) -> tuple[int, dict[str, str], bytes]:
    raw = raw_request(
        sidecar.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\nConnection: close\r\n\r\n".encode()
    )
    status, headers, body = split_response(raw)
    return status, dict(headers), body


def error_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    return [e for e in sidecar.logs() if e.get("event") == "egress_error"]


def assert_denied(
    sidecar: Sidecar, caught: Catchers, response: tuple[int, dict[str, str], bytes],
    status: int, kind: str, reason: str | None, errors_before: int,
) -> None:
    got_status, headers, body = response
    assert (got_status, headers.get("x-egress-error")) == (status, kind), body
    assert body.count(b"\n") == 1 and body.startswith(f"egress-sidecar: {kind}:".encode())
    # Exactly one error line, ours: a request that looped back into the sidecar would add one.
    lines = wait_until(lambda: error_lines(sidecar)[errors_before:] or None, 5, message="error log line")
    assert len(error_lines(sidecar)) == errors_before + 1, lines
    assert lines[0]["kind"] == kind and lines[0].get("reason") == reason
    caught.barrier()
    assert caught.connections() == []


@pytest.mark.parametrize("vector", VECTORS, ids=[v.id for v in VECTORS])
def test_ssrf_vector_is_denied_and_nothing_connects(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, vector: Vector
) -> None:
    before = len(error_lines(sidecar))
    response = forward(sidecar, vector.url)
    assert_denied(sidecar, caught, response, vector.status, vector.kind, vector.reason, before)


def test_ssrf_vectors_cover_at_least_thirty_cases() -> None:
    assert len(VECTORS) >= 30


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/meta/meta-data/", "metadata"), ("/internal/x", "private")],
    ids=["route-to-metadata-literal", "route-name-resolving-private"],
)
def test_route_to_a_denied_address_is_denied(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, path: str, reason: str
) -> None:
    before = len(error_lines(sidecar))
    assert_denied(sidecar, caught, via_route(sidecar, path), 403, "denied_ip", reason, before)


def test_dns_rebinding_cannot_reach_the_private_address(sidecar: Sidecar, caught: Catchers, dns: DNSServer) -> None:
    # First answer public: allowed, and the connection goes to exactly that checked address.
    status, _headers, body = via_route(sidecar, "/rebind/first")
    assert (status, body) == (200, b"caught 1.1.1.1:443")
    assert dns.queries.count(("rebind.test", 1)) == 1  # resolved once: checked and dialled
    caught.barrier()
    assert [(c.address, c.port, c.sni) for c in caught.connections()] == [("1.1.1.1", 443, "rebind.test")]
    caught.clear()
    # The catcher closed that connection; the next one resolves again and gets 10.0.0.1.
    before = len(error_lines(sidecar))
    assert_denied(sidecar, caught, via_route(sidecar, "/rebind/second"), 403, "denied_ip", "private", before)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://public.test/hello", "1.1.1.1"),
        ("http://public.static.test/", "1.1.1.1"),
        ("http://1.1.1.1/", "1.1.1.1"),
        ("http://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
    ],
    ids=["dns-name", "static-name", "ipv4-literal", "ipv6-literal"],
)
def test_positive_control_public_destination_gets_through(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, url: str, address: str
) -> None:
    status, headers, body = forward(sidecar, url)
    assert (status, body) == (200, f"caught {address}:443".encode()), headers
    caught.barrier()
    assert [(c.address, c.port) for c in caught.connections()] == [(address, 443)]


def test_positive_control_route_gets_through(sidecar: Sidecar, caught: Catchers, dns: DNSServer) -> None:
    status, _headers, body = via_route(sidecar, "/public/x")
    assert (status, body) == (200, b"caught 1.1.1.1:443")
    caught.barrier()
    assert [(c.address, c.sni) for c in caught.connections()] == [("1.1.1.1", "public.test")]


def test_curl_forward_proxy_to_metadata_is_denied(sidecar: Sidecar, caught: Catchers) -> None:
    result = subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-x", sidecar.url, "-D", "-", "http://169.254.169.254/latest/meta-data/"],
        capture_output=True, timeout=30, check=True, text=True,
    )
    assert result.stdout.startswith("HTTP/1.1 403")
    assert "x-egress-error: denied_ip" in result.stdout
    assert "169.254.169.254 is a cloud metadata address" in result.stdout
    caught.barrier()
    assert caught.connections() == []


def test_allow_cidrs_opts_a_private_range_back_in(
    caught: Catchers, ca_file: str, tmp_path: Path, system_resolver: None
) -> None:
    config = base_config(ca_file, policy={"allow_cidrs": ["10.0.0.0/8"]})
    config["admin"]["host"] = "0.0.0.0"  # as in a pod: the admin listener on every address
    opened = start_sidecar(tmp_path, config)
    try:
        # 10.0.0.1 is allowed, but on the admin port it is the sidecar itself (a local address).
        before = len(error_lines(opened))
        assert_denied(opened, caught, forward(opened, f"http://10.0.0.1:{ADMIN}/config"), 403, "denied_ip",
                      "listener", before)
        status, _headers, body = forward(opened, "http://10.0.0.1/")
        assert (status, body) == (200, b"caught 10.0.0.1:443")
        caught.barrier()
        assert [(c.address, c.port) for c in caught.connections()] == [("10.0.0.1", 443)]
        caught.clear()
        before = len(error_lines(opened))
        assert_denied(opened, caught, forward(opened, "http://192.168.1.1/"), 403, "denied_ip", "private", before)
    finally:
        opened.terminate()


@pytest.mark.parametrize(
    ("url", "host"),
    [("http://169.254.169.254/latest/", "public.test"), ("http://public.test/", "169.254.169.254")],
    ids=["uri-metadata-host-public", "uri-public-host-metadata"],
)
def test_disagreeing_uri_and_host_never_reach_the_denied_one(
    sidecar: Sidecar, caught: Catchers, dns: DNSServer, url: str, host: str
) -> None:
    status, headers, _body = forward(sidecar, url, host)
    caught.barrier()
    # Whichever the parser takes as the destination is checked: public.test may be reached,
    # the metadata address never is.
    assert {c.address for c in caught.connections()} <= {"1.1.1.1"}
    assert status == 200 or headers.get("x-egress-error") == "denied_ip"
