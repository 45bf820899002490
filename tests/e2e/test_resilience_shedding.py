"""Load shedding: past max_in_flight (route or global) 503 overloaded at once; pool-wait deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Sidecar
from tests.servers.upstream import Upstream, wait_until


def route(upstream: Upstream, **extra: object) -> dict[str, object]:
    return {"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}", **extra}


def seen(upstream: Upstream, path: str) -> int:
    return sum(1 for request in upstream.requests if request.target.startswith(path))


def timed_get(url: str, **kwargs: object) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = httpx.get(url, trust_env=False, timeout=15, **kwargs)  # type: ignore[arg-type]
    return response, time.monotonic() - start


def test_route_over_max_in_flight_gets_503_overloaded_at_once(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[route(fresh_upstream, max_in_flight=2)])
    slow = f"{sidecar.url}/up/slow?n=20&interval=0.1"  # 2 s of streamed body: in flight until relayed
    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(timed_get, slow) for _ in range(2)]
        wait_until(lambda: seen(fresh_upstream, "/slow") == 2, message="both slow requests upstream")
        response, elapsed = timed_get(f"{sidecar.url}/up/echo")
        assert response.status_code == 503
        assert response.headers["x-egress-error"] == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert elapsed < 0.5
        assert seen(fresh_upstream, "/echo") == 0  # refused before anything went upstream
        for holder in holders:
            held, _ = holder.result(30)
            assert held.status_code == 200 and len(held.content) == 20 * 1024
    assert httpx.get(f"{sidecar.url}/up/echo", trust_env=False, timeout=15).status_code == 200


def test_global_max_in_flight_covers_routes_and_forward_proxy_form(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[route(fresh_upstream)], limits={"max_in_flight": 2})
    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(timed_get, f"{sidecar.url}/up/delay?s=1.5") for _ in range(2)]
        wait_until(lambda: seen(fresh_upstream, "/delay") == 2, message="both delayed requests upstream")
        with sidecar.client(timeout=15) as client:
            response = client.get(f"http://localhost:{fresh_upstream.port}/echo")
        assert response.status_code == 503 and response.headers["x-egress-error"] == "overloaded"
        assert timed_get(f"{sidecar.url}/up/echo")[0].headers["x-egress-error"] == "overloaded"
        assert [h.result(30)[0].status_code for h in holders] == [200, 200]
    assert seen(fresh_upstream, "/echo") == 0


def test_in_flight_slots_are_given_back_on_every_path(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[route(fresh_upstream, max_in_flight=1)])
    with httpx.Client(base_url=sidecar.url, trust_env=False, timeout=15) as client:

        def slot_free() -> bool:
            # The sidecar frees a slot when it notices the app left, a moment after the app closed.
            return client.get("/up/echo").status_code == 200

        for _ in range(3):
            # Each of these holds the route's single slot; one leak would make every later call 503.
            assert client.get("/up/reset").status_code == 502  # error before headers
            assert client.get("/up/status/503").status_code == 503  # upstream error status
            assert client.get("/up/echo").status_code == 200
            with client.stream("GET", "/up/slow?n=50&interval=0.05") as response:  # app leaves mid-body
                next(response.iter_raw())
            wait_until(slot_free, timeout=10, message="slot free after the app left mid-body")
            with client.stream("GET", "/up/reset-mid") as response:  # upstream fails mid-body
                try:
                    response.read()
                except httpx.HTTPError:
                    pass
            wait_until(slot_free, timeout=10, message="slot free after the upstream failed mid-body")


def test_pool_wait_deadline_gives_503_pool_timeout(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(
        routes=[route(fresh_upstream)],
        pool={"max_connections": 1, "max_keepalive_connections": 1},
        timeouts={"pool": "300ms"},
    )
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(timed_get, f"{sidecar.url}/up/delay?s=2")
        wait_until(lambda: seen(fresh_upstream, "/delay") == 1, message="the one connection is busy")
        response, elapsed = timed_get(f"{sidecar.url}/up/echo")
        assert response.status_code == 503
        assert response.headers["x-egress-error"] == "pool_timeout"
        assert response.headers["retry-after"] == "1"
        assert 0.25 <= elapsed < 1.5  # the pool deadline, well before the holder's 2 s
        assert holder.result(30)[0].status_code == 200
    assert seen(fresh_upstream, "/echo") == 0
