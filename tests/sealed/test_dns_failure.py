"""A name that does not resolve: `502 connect_error` whose body says the name did not resolve.

Sealed: the namespace's resolver is the test DNS server on 127.0.0.1:53, which answers
NXDOMAIN for every name outside its table, so no query ever leaves the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Sidecar, base_config, start_sidecar
from tests.sealed.catchers import Catchers
from tests.sealed.dns import DNSServer
from tests.sealed.test_ssrf import error_lines, forward, via_route


@pytest.fixture
def sidecar(system_resolver: None, ca_file: str, tmp_path: Path) -> Iterator[Sidecar]:
    config = base_config(ca_file, routes=[
        {"name": "gone", "prefix": "/gone", "upstream": "https://gone.test"},
        # HTTP/2 routes dial through httpcore and the guard backend (sidecar/policy/guard.py), not our transport.
        {"name": "gone-h2", "prefix": "/gone-h2", "upstream": "https://gone-h2.test", "http2": True},
    ])
    started = start_sidecar(tmp_path, config)
    yield started
    started.terminate()


@pytest.mark.parametrize("how", ["forward", "route", "route-h2"])
def test_a_name_that_does_not_resolve_says_so(
    sidecar: Sidecar, dns: DNSServer, caught: Catchers, how: str
) -> None:
    host = {"forward": "nowhere.test", "route": "gone.test", "route-h2": "gone-h2.test"}[how]
    if how == "forward":
        status, headers, body = forward(sidecar, f"http://{host}/x")
    else:
        status, headers, body = via_route(sidecar, f"/{host.removesuffix('.test')}/x")
    assert (status, headers.get("x-egress-error")) == (502, "connect_error"), body
    assert body.decode().startswith("egress-sidecar: connect_error: ")
    assert f"({host} does not resolve: " in body.decode(), body
    assert (host, 1) in dns.queries  # the resolver was asked, and said no
    caught.barrier()
    assert caught.connections() == []
    line = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and host in e.get("detail", ""))
    assert line["kind"] == "connect_error" and f"cannot resolve {host}" in line["detail"]
    assert error_lines(sidecar)
