"""The sealed harness itself: sealed, targets local, catchers see what reaches them."""

from __future__ import annotations

import errno
import socket

import pytest

from tests.sealed import netns
from tests.sealed.catchers import Catchers
from tests.sealed.dns import DNSServer


def test_barrier_reports_nothing_when_nothing_connected(caught: Catchers) -> None:
    caught.barrier()
    assert caught.connections() == []


def test_namespace_has_only_loopback_and_no_route_out() -> None:
    assert netns.interfaces() == ["lo"]
    assert netns.not_sealed_reason() is None


@pytest.mark.parametrize("address", [netns.UNREACHABLE_V4, netns.UNREACHABLE_V6, "8.8.8.8", "2001:4860:4860::8888"])
def test_addresses_not_on_lo_are_unreachable_at_once(address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as sock, pytest.raises(OSError) as info:
        sock.settimeout(1)
        sock.connect((address, 443))
    assert info.value.errno == errno.ENETUNREACH


@pytest.mark.parametrize("address", netns.IPV4_TARGETS + netns.IPV6_TARGETS)
def test_catchers_record_a_direct_connection_to_every_target(address: str, caught: Catchers) -> None:
    for port in (80, 443):
        with socket.create_connection((address, port), timeout=2):
            pass
    caught.barrier()
    seen = {(c.address, c.port) for c in caught.connections()}
    assert {(address, 80), (address, 443)} <= seen


def _lookup(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def test_system_resolver_answers_from_the_sealed_dns_server(dns: DNSServer) -> None:
    assert _lookup("mixed.test") == ["10.0.0.1", "8.8.4.4"]
    assert _lookup("rebind.test") == ["1.1.1.1"]
    assert _lookup("rebind.test") == ["10.0.0.1"]  # the second answer rebinds
    with pytest.raises(socket.gaierror):
        _lookup("unknown.test")
    assert ("mixed.test", 1) in dns.queries
