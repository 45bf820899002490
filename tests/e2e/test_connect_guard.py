"""The connect guard on loopback: connections go to the checked address, SNI keeps the name."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable

import httpx
import pytest
import trustme

from sidecar.policy.egress import EgressPolicy, PolicyDenied
from sidecar.policy.guard import guard_transport
from tests.conftest import Sidecar, server_context
from tests.servers.upstream import Upstream, UpstreamServer


def test_static_name_is_dialled_at_its_checked_address_with_sni_and_cert_for_the_name(
    make_sidecar: Callable[..., Sidecar], ca: trustme.CA
) -> None:
    server = UpstreamServer(server_context(ca, "svc.internal.test"))
    upstream = server.start()
    try:
        sidecar = make_sidecar(
            resolve={"svc.internal.test": "127.0.0.1"},
            routes=[{"name": "svc", "prefix": "/svc", "upstream": f"https://svc.internal.test:{upstream.port}"}],
        )
        with httpx.Client(trust_env=False) as client:  # origin-form: a route
            response = client.get(f"{sidecar.url}/svc/echo")
        assert response.status_code == 200, response.text
        headers = json.loads(response.content)["headers"]
        assert ["host", f"svc.internal.test:{upstream.port}"] in headers
    finally:
        server.stop()


def test_guard_tries_the_next_checked_address_when_one_refuses(upstream: Upstream, ca_file: str) -> None:
    # 127.0.0.2 listens on nothing (refused at once); 127.0.0.1 is the upstream.
    policy = EgressPolicy(allow_cidrs=["127.0.0.0/8"], static_resolve={"localhost": ["127.0.0.2", "127.0.0.1"]})

    async def run() -> int:
        transport = guard_transport(httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=ca_file)), policy.resolve)
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(f"https://localhost:{upstream.port}/echo")).status_code

    assert asyncio.run(run()) == 200


def test_guard_denial_passes_through_httpx_unchanged_and_nothing_connects(fresh_upstream: Upstream) -> None:
    policy = EgressPolicy()  # loopback denied

    async def run() -> None:
        transport = guard_transport(httpx.AsyncHTTPTransport(), policy.resolve)
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"https://localhost:{fresh_upstream.port}/echo")

    with pytest.raises(PolicyDenied) as info:
        asyncio.run(run())
    assert (info.value.kind, info.value.reason) == ("denied_ip", "loopback")
    assert fresh_upstream.connections == 0
