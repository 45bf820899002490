"""Everything the request path needs, built once from config at start."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sidecar.config import Config
from sidecar.credentials import injected_headers
from sidecar.intercept import Interceptor, build_interceptor
from sidecar.observe import Observer
from sidecar.policy import EgressPolicy
from sidecar.resilience import Resilience
from sidecar.routing import Router, compile_route
from sidecar.tls import TLSContexts
from sidecar.tunnel import Tunnels, TunnelSettings
from sidecar.upstream import Upstream


@dataclass
class Runtime:
    config: Config
    router: Router
    policy: EgressPolicy
    upstream: Upstream
    observer: Observer
    resilience: Resilience
    interceptor: Interceptor | None = None  # TLS interception, when configured
    in_flight: int = 0
    draining: bool = False  # SIGTERM seen: not ready, still serving
    stopping: bool = False  # grace over or nothing in flight: new requests get 503 draining
    ready: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tunnels: Tunnels | None = None  # CONNECT (and captured TLS) tunnels; set by build_runtime

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def build_runtime(config: Config, observer: Observer | None = None, contexts: TLSContexts | None = None) -> Runtime:
    routes = [
        compile_route(route, config, injected_headers(route))
        for route in config.routes
    ]
    policy = EgressPolicy.from_config(config)
    upstream = Upstream(config, routes, resolve=policy.resolve, contexts=contexts)
    runtime = Runtime(
        config=config,
        router=Router(config, routes),
        policy=policy,
        upstream=upstream,
        observer=observer or Observer(config, upstream.pool_stats),
        resilience=Resilience(config, routes),
        interceptor=build_interceptor(config),
    )
    runtime.tunnels = Tunnels(
        TunnelSettings.from_config(config),
        policy,
        runtime.observer,
        is_self=runtime.router.is_self,
        stopping=lambda: runtime.stopping,
        on_open=runtime.request_started,  # a tunnel holds the drain like a request
        on_close=runtime.request_finished,
    )
    metrics = getattr(runtime.observer, "metrics", None)
    if metrics is not None:
        metrics.watch_breakers(runtime.resilience.breakers.states)
        metrics.watch_abandoned(upstream.abandoned_counts)
        metrics.watch_tunnels(runtime.tunnels)
    runtime.idle.set()
    return runtime
