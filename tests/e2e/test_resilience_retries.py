"""Retries happen exactly where they should, counted at the upstream; never for POST by default."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar
from tests.servers.upstream import ResettingServer, Upstream, random_bytes

FAST_BACKOFF = {"backoff_base": "1ms", "backoff_max": "5ms"}


def retry_route(port: int, **retries: Any) -> dict[str, Any]:
    return {"name": "up", "prefix": "/up", "upstream": f"https://localhost:{port}",
            "retries": {**FAST_BACKOFF, **retries}}


def tries(upstream: Upstream, path: str) -> list[Any]:
    return [seen for seen in upstream.requests if seen.target.startswith(path)]


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Callable[[Sidecar], httpx.Client]]:
    made: list[httpx.Client] = []

    def make(sidecar: Sidecar) -> httpx.Client:
        made.append(httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_get_reset_before_headers_is_retried_until_it_succeeds(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=2)])
    response = client(sidecar).get("/up/flaky?key=get&fail=2")
    assert response.status_code == 200, response.text
    assert response.json()["tries"] == 3
    assert len(tries(fresh_upstream, "/flaky?key=get")) == 3


def test_post_is_never_retried_by_default(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=2, on=["connect", "reset", 503])])
    c = client(sidecar)
    response = c.post("/up/flaky?key=post&fail=2", content=b"order #1")
    assert response.status_code == 502
    assert response.headers["x-egress-error"] == "upstream_reset"
    assert len(tries(fresh_upstream, "/flaky?key=post")) == 1
    response = c.post("/up/flaky?key=post503&fail=2&mode=503", content=b"order #2")
    assert response.status_code == 503 and "x-egress-error" not in response.headers  # the upstream's own 503
    assert len(tries(fresh_upstream, "/flaky?key=post503")) == 1


def test_post_is_retried_with_the_same_body_when_the_route_opts_in(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=2, methods=["GET", "POST"])])
    body = random_bytes(5000, 3)
    response = client(sidecar).post("/up/flaky?key=optin&fail=2", content=body)
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [seen.body_size for seen in tries(fresh_upstream, "/flaky?key=optin")] == [5000, 5000, 5000]


def test_streamed_body_up_to_64k_is_replayed_byte_exact(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=1)])
    body = random_bytes(65536, 4)

    def chunks() -> Iterator[bytes]:  # chunked transfer: the sidecar cannot know the size up front
        for offset in range(0, len(body), 8192):
            yield body[offset : offset + 8192]

    response = client(sidecar).put("/up/flaky?key=put64&fail=1", content=chunks())
    assert response.status_code == 200, response.text
    assert response.json() == {"tries": 2, "body_size": 65536, "body_sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_64k_is_streamed_and_not_retried(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client],
    chunked: bool,
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=2)])
    body = random_bytes(65537, 5)
    content: Any = iter([body[:40000], body[40000:]]) if chunked else body
    response = client(sidecar).put(f"/up/flaky?key=big{chunked}&fail=1", content=content)
    assert response.status_code == 502
    assert response.headers["x-egress-error"] == "upstream_reset"
    assert [seen.body_size for seen in tries(fresh_upstream, f"/flaky?key=big{chunked}")] == [65537]


def test_configured_503_is_retried_and_its_connection_reused(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=3, on=["reset", 503])])
    response = client(sidecar).get("/up/flaky?key=s503&fail=2&mode=503")
    assert response.status_code == 200 and response.json()["tries"] == 3
    # The discarded 503s were read to their end, so one connection carried all three tries.
    assert fresh_upstream.connections == 1


def test_status_not_configured_is_relayed_untouched(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=3, on=["reset", 503])])
    response = client(sidecar).get("/up/flaky?key=s502&fail=1&mode=502")
    assert response.status_code == 502 and response.text == "failed" and response.headers["x-try"] == "1"
    assert len(tries(fresh_upstream, "/flaky?key=s502")) == 1


def test_exhausted_retries_return_the_last_failure(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[retry_route(fresh_upstream.port, attempts=2, on=["reset", 503])])
    c = client(sidecar)
    response = c.get("/up/flaky?key=ex503&fail=9&mode=503")
    assert response.status_code == 503 and response.headers["x-try"] == "3"  # the third try's own answer
    response = c.get("/up/flaky?key=exreset&fail=9")
    assert response.headers["x-egress-error"] == "upstream_reset"
    assert len(tries(fresh_upstream, "/flaky?key=exreset")) == 3


@pytest.mark.parametrize(("on", "expected"), [(["reset", "timeout"], 2), (["connect", "reset"], 1)])
def test_read_timeout_before_headers_is_retried_only_when_configured(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client],
    on: list[str], expected: int,
) -> None:
    route = retry_route(fresh_upstream.port, attempts=1, on=on)
    route["timeouts"] = {"read": "300ms"}
    sidecar = make_sidecar(routes=[route])
    response = client(sidecar).get("/up/flaky?key=stall&fail=1&mode=stall")
    if expected == 2:
        assert response.status_code == 200 and response.json()["tries"] == 2
    else:
        assert response.status_code == 504 and response.headers["x-egress-error"] == "read_timeout"
    assert len(tries(fresh_upstream, "/flaky?key=stall")) == expected


def test_connect_failure_is_retried_for_get_only(
    make_sidecar: Callable[..., Sidecar], client: Callable[[Sidecar], httpx.Client]
) -> None:
    server = ResettingServer()
    try:
        sidecar = make_sidecar(routes=[retry_route(server.port, attempts=2)])
        c = client(sidecar)
        response = c.get("/up/x")
        assert response.status_code == 502 and response.headers["x-egress-error"] == "connect_error"
        assert server.accepted == 3
        response = c.post("/up/x", content=b"x")
        assert response.headers["x-egress-error"] == "connect_error"
        assert server.accepted == 4
    finally:
        server.stop()


def test_no_retries_without_a_retries_section(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}])
    assert client(sidecar).get("/up/flaky?key=none&fail=1").status_code == 502
    assert len(tries(fresh_upstream, "/flaky?key=none")) == 1


def test_budget_caps_retries_during_an_outage(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream, client: Callable[[Sidecar], httpx.Client]
) -> None:
    # Without a budget, 100 requests with 3 retries each would be 400 tries.
    sidecar = make_sidecar(routes=[retry_route(
        fresh_upstream.port, attempts=3, budget={"percent": 20, "window": "60s", "min_retries": 3})])
    c = client(sidecar)
    statuses = [c.get("/up/reset").status_code for _ in range(100)]
    assert statuses == [502] * 100
    seen = len(tries(fresh_upstream, "/reset"))
    assert 100 + 20 <= seen <= 100 + 20 + 3, seen
    print(json.dumps({"requests": 100, "upstream_tries": seen}))
