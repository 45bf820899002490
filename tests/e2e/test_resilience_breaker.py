"""Circuit breaking per upstream: opens after N failures, fails fast while open, one half-open probe."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Sidecar
from tests.servers.upstream import Upstream, wait_until

COOLDOWN = 2


def breaker_route(upstream: Upstream, name: str = "up", **breaker: Any) -> dict[str, Any]:
    return {"name": name, "prefix": f"/{name}", "upstream": f"https://localhost:{upstream.port}",
            "circuit_breaker": {"consecutive_failures": 3, "window": "10s", "cooldown": f"{COOLDOWN}s", **breaker}}


def seen(upstream: Upstream, path: str) -> int:
    return sum(1 for request in upstream.requests if request.target.startswith(path))


@pytest.fixture
def sidecar(make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream) -> Sidecar:
    return make_sidecar(routes=[breaker_route(fresh_upstream)])


@pytest.fixture
def open_circuit(sidecar: Sidecar, fresh_upstream: Upstream) -> Iterator[tuple[httpx.Client, Upstream]]:
    """A sidecar whose breaker for the upstream was just opened by 3 resets before headers."""
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        for _ in range(3):
            response = client.get("/up/reset")
            assert response.headers["x-egress-error"] == "upstream_reset"
        yield client, fresh_upstream


def first_admitted(client: httpx.Client, path: str, timeout: float = COOLDOWN + 5) -> httpx.Response:
    """Send `path` until the breaker lets it through (each refusal is answered without upstream I/O)."""
    def attempt() -> httpx.Response | None:
        response = client.get(path)
        return None if response.headers.get("x-egress-error") == "circuit_open" else response

    result: httpx.Response = wait_until(attempt, timeout=timeout, interval=0.05, message="half-open probe")
    return result


def test_open_circuit_fails_fast_without_touching_the_upstream(open_circuit: tuple[httpx.Client, Upstream]) -> None:
    client, upstream = open_circuit
    assert upstream.connections == 3
    for _ in range(20):
        start = time.monotonic()
        response = client.get("/up/echo")
        assert time.monotonic() - start < 0.5
        assert response.status_code == 503
        assert response.headers["x-egress-error"] == "circuit_open"
        assert 1 <= int(response.headers["retry-after"]) <= COOLDOWN
    assert upstream.connections == 3  # no new connection while open
    assert seen(upstream, "/echo") == 0


def test_half_open_probe_success_closes_the_circuit(
    open_circuit: tuple[httpx.Client, Upstream], sidecar: Sidecar
) -> None:
    client, upstream = open_circuit
    probe = first_admitted(client, "/up/echo")
    assert probe.status_code == 200
    assert seen(upstream, "/echo") == 1 and upstream.connections == 4
    assert [client.get("/up/echo").status_code for _ in range(5)] == [200] * 5
    # Each transition is logged once, with the upstream it concerns.
    sidecar.wait_log(lambda e: e.get("event") == "circuit_state" and e.get("state") == "closed")
    transitions = [(e["state"], e["upstream"]) for e in sidecar.logs() if e.get("event") == "circuit_state"]
    assert transitions == [(state, f"localhost:{upstream.port}") for state in ("open", "half_open", "closed")]


def test_half_open_probe_failure_opens_it_again_for_a_full_cooldown(
    open_circuit: tuple[httpx.Client, Upstream],
) -> None:
    client, upstream = open_circuit
    probe = first_admitted(client, "/up/reset")
    assert probe.headers["x-egress-error"] == "upstream_reset"
    assert seen(upstream, "/reset") == 4
    response = client.get("/up/echo")
    assert response.headers["x-egress-error"] == "circuit_open"
    assert response.headers["retry-after"] == str(COOLDOWN)
    assert seen(upstream, "/echo") == 0


def test_half_open_lets_exactly_one_probe_through(open_circuit: tuple[httpx.Client, Upstream]) -> None:
    client, upstream = open_circuit
    probe: list[httpx.Response] = []
    prober = threading.Thread(target=lambda: probe.append(first_admitted(client, "/up/delay?s=1")))
    prober.start()
    try:
        wait_until(lambda: seen(upstream, "/delay") == 1, timeout=COOLDOWN + 5, message="probe upstream")
        with httpx.Client(base_url=str(client.base_url), trust_env=False, timeout=15) as other:
            others = [other.get("/up/echo") for _ in range(5)]  # while the probe waits for its head
        assert [r.headers.get("x-egress-error") for r in others] == ["circuit_open"] * 5
    finally:
        prober.join(15)
    assert probe[0].status_code == 200
    assert seen(upstream, "/echo") == 0
    assert client.get("/up/echo").status_code == 200  # the probe closed it


def test_upstream_5xx_counts_as_failure_and_4xx_does_not(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[breaker_route(fresh_upstream)])
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        for _ in range(5):
            assert client.get("/up/status/404").status_code == 404
        assert [client.get("/up/status/500").status_code for _ in range(2)] == [500, 500]
        assert client.get("/up/status/404").status_code == 404  # a success ends the streak
        assert [client.get("/up/status/503").status_code for _ in range(3)] == [503] * 3
        response = client.get("/up/status/404")
        assert response.headers["x-egress-error"] == "circuit_open"


def test_routes_naming_the_same_upstream_share_its_breaker(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[breaker_route(fresh_upstream, "a"), breaker_route(fresh_upstream, "b")])
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        for _ in range(3):
            client.get("/a/reset")
        assert client.get("/b/echo").headers["x-egress-error"] == "circuit_open"


def test_retries_stop_when_the_circuit_opens(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    route = breaker_route(fresh_upstream)
    route["retries"] = {"attempts": 5, "backoff_base": "1ms", "backoff_max": "2ms"}
    sidecar = make_sidecar(routes=[route])
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:
        response = client.get("/up/reset")
        assert response.headers["x-egress-error"] == "upstream_reset"  # the last real failure
    assert seen(fresh_upstream, "/reset") == 3  # not 6: the third failure opened the circuit


def test_circuit_state_is_exported_as_a_gauge(
    open_circuit: tuple[httpx.Client, Upstream], sidecar: Sidecar
) -> None:
    _, upstream = open_circuit
    scrape = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert f'egress_circuit_state{{upstream="localhost:{upstream.port}"}} 2.0' in scrape
    probe = first_admitted(open_circuit[0], "/up/echo")
    assert probe.status_code == 200
    scrape = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert f'egress_circuit_state{{upstream="localhost:{upstream.port}"}} 0.0' in scrape
