"""Shared helpers of the transport tests: fixtures and a request builder (transport only)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sidecar.upstream.transport import HTTP11Transport
from tests.servers.loop_upstream import Certs, Upstream, upstream

TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


@pytest.fixture(scope="session")
def certs() -> Certs:
    return Certs()


@pytest.fixture
def server(certs: Certs) -> Iterator[Upstream]:
    with upstream(certs) as running:
        yield running


@pytest.fixture
def plain_server() -> Iterator[Upstream]:
    with upstream(None) as running:
        yield running


def make_request(
    method: str,
    url: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    content: Any = None,
    stream: Any = None,
    timeouts: dict[str, float | None] | None = None,
    trace: Any = None,
) -> httpx.Request:
    """A request as the sidecar's forward path builds it: Host set by the caller.

    `content` lets httpx add its framing header; `stream` passes a body with none.
    """
    parsed = httpx.URL(url)
    extensions: dict[str, Any] = {"timeout": {**TIMEOUTS, **(timeouts or {})}}
    if trace is not None:
        extensions["trace"] = trace
    return httpx.Request(
        method, parsed, headers=[("Host", parsed.netloc.decode()), *(headers or [])],
        content=content, stream=stream, extensions=extensions,
    )


async def fetch(transport: HTTP11Transport, request: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await transport.handle_async_request(request)
    body = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, body


def transport_for(certs: Certs, **kwargs: Any) -> HTTP11Transport:
    return HTTP11Transport(certs.client_context(), **kwargs)
