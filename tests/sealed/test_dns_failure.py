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
    config = base_config(ca_file, routes=[{"name": "gone", "prefix": "/gone", "upstream": "https://gone.test"}])
    started = start_sidecar(tmp_path, config)
    yield started
    started.terminate()


@pytest.mark.parametrize("how", ["forward", "route"])
def test_a_name_that_does_not_resolve_says_so(
    sidecar: Sidecar, dns: DNSServer, caught: Catchers, how: str
) -> None:
    host = "nowhere.test" if how == "forward" else "gone.test"
    status, headers, body = forward(sidecar, f"http://{host}/x") if how == "forward" else via_route(sidecar, "/gone/x")
    assert (status, headers.get("x-egress-error")) == (502, "connect_error"), body
    assert body.decode().startswith("egress-sidecar: connect_error: ")
    assert f"({host} does not resolve: " in body.decode(), body
    assert (host, 1) in dns.queries  # the resolver was asked, and said no
    caught.barrier()
    assert caught.connections() == []
    line = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and host in e.get("detail", ""))
    assert line["kind"] == "connect_error" and f"cannot resolve {host}" in line["detail"]
    assert error_lines(sidecar)
