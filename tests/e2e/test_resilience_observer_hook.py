"""The retry hook the metrics use: `Observer.retried(route, reason)` once per retry, with its reason.

A sidecar subprocess cannot show which observer calls happened, so this drives the real data
path in-process instead: the real runtime, a real TLS upstream on 127.0.0.1 and real sockets,
with an Observer subclass that records the calls (the metrics observer plugs in the same way).
"""

from __future__ import annotations

from typing import Any

import httpx
import uvloop

from sidecar import config as cfg
from sidecar.observe.observer import Observer
from sidecar.runtime import build_runtime
from tests.conftest import base_config
from tests.servers.upstream import ResettingServer, Upstream


class Recording(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.retries: list[tuple[str, str]] = []

    def retried(self, route: str, reason: str) -> None:
        self.retries.append((route, reason))


def run(ca_file: str, routes: list[dict[str, Any]], paths: list[tuple[str, str]]) -> tuple[list[int], Recording]:
    observer = Recording()
    runtime = build_runtime(cfg.from_mapping(base_config(ca_file, routes=routes)), observer)
    by_name = {route.name: route for route in runtime.router.routes}

    async def go() -> list[int]:
        statuses = []
        try:
            for name, path in paths:
                route = by_name[name]
                request = httpx.Request("GET", f"{route.scheme}://{route.host}:{route.port}{path}",
                                        extensions={"timeout": route.timeouts})
                try:
                    response = await runtime.active.sender.send(request, route)
                except httpx.HTTPError:
                    statuses.append(0)
                    continue
                async for _ in response.stream:  # type: ignore[union-attr]
                    pass
                await response.aclose()
                statuses.append(response.status_code)
        finally:
            await runtime.upstream.aclose()
        return statuses

    return uvloop.run(go()), observer  # the sidecar's own loop


def test_each_retry_is_reported_with_route_and_reason(ca_file: str, fresh_upstream: Upstream) -> None:
    refusing = ResettingServer()
    try:
        routes = [
            {"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}",
             "retries": {"attempts": 3, "on": ["connect", "reset", 503], "backoff_base": "1ms"}},
            {"name": "down", "prefix": "/down", "upstream": f"https://localhost:{refusing.port}",
             "retries": {"attempts": 1, "backoff_base": "1ms"}},
        ]
        statuses, observer = run(ca_file, routes, [
            ("up", "/flaky?key=r&fail=2"),             # two resets, then 200
            ("up", "/flaky?key=s&fail=1&mode=503"),    # one 503, then 200
            ("up", "/echo"),                           # no retry
            ("down", "/x"),                            # connect failure, one retry, then gives up
        ])
    finally:
        refusing.stop()
    assert statuses == [200, 200, 200, 0]
    assert observer.retries == [("up", "reset"), ("up", "reset"), ("up", "503"), ("down", "connect")]
