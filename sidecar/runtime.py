"""Everything the request path needs: built from config at start, rebuilt whole on a reload.

`Runtime` lives as long as the process (the observer, the lifecycle flags, the count of
requests in flight). What a config decides lives in a `Snapshot` (router, policy, upstream
pools, resilience, forwarding switches), built whole and swapped in one assignment
(`Runtime.active`) by a reload (sidecar/reload.py). A request reads `runtime.active` once, at
its start, and uses that snapshot to its end: a reload never changes the rules under a
request in flight, and the hot path pays one attribute read for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.config import Config, config_sha256
from sidecar.intercept.interceptor import Interceptor, build_interceptor
from sidecar.observe.observer import Observer
from sidecar.policy.addresses import IPAddress
from sidecar.policy.egress import EgressPolicy
from sidecar.proxy.credentials import injected_headers
from sidecar.proxy.routing import Router, compile_route
from sidecar.resilience.sender import Resilience, ResilientSender
from sidecar.tunnel.tunnels import Tunnels, TunnelSettings
from sidecar.upstream.client import UpstreamClient
from sidecar.upstream.tls import TLSContexts


class PolicyResolve:
    """The connect guard the pools dial through: always the active policy's `resolve`.

    Pools outlive a reload when their TLS settings did not change; the address rules they
    dial under must still be the newest (a reload that narrows `allow_cidrs` applies to the
    next connection of every pool).
    """

    __slots__ = ("policy",)

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    async def __call__(self, host: str, port: int) -> list[str]:
        return await self.policy.resolve(host, port)


@dataclass(eq=False)
class Snapshot:
    """What one config decides, built whole before it is used; never changed once active."""

    config: Config
    router: Router
    policy: EgressPolicy
    upstream: UpstreamClient
    resilience: Resilience
    sender: ResilientSender  # upstream.send under this snapshot's resilience rules
    observer: Observer
    sha256: str
    # forwarding and body limits, read per request
    via: bool
    forwarded_for: bool
    request_id: bool
    body_idle_timeout: float
    in_flight: int = 0  # requests started under this snapshot, so a retired one knows when it is idle


def build_snapshot(
    config: Config,
    observer: Observer,
    resolve: PolicyResolve,
    *,
    contexts: TLSContexts | None = None,
    previous: Snapshot | None = None,
    listeners: Sequence[tuple[str, int]] = (),
    local_addresses: frozenset[IPAddress] | None = None,
) -> Snapshot:
    """Build a snapshot; with `previous`, keep its pools, breakers and gates where nothing changed.

    Raises ConfigError (CredentialError: an unreadable secret) or OSError/ssl.SSLError (a CA or
    client certificate that cannot be loaded): a reload that raises leaves the old one active.
    """
    routes = [compile_route(route, config, injected_headers(route)) for route in config.routes]
    policy = EgressPolicy.from_config(config, local_addresses)
    for host, port in listeners:
        policy.add_listener(host, port)
    upstream = UpstreamClient(config, routes, resolve=resolve, contexts=contexts, on_retry=observer.retried,
                        previous=previous.upstream if previous is not None else None)
    forwarding = config.forwarding
    resilience = Resilience(config, routes, previous=previous.resilience if previous is not None else None)
    return Snapshot(
        config=config,
        router=Router(config, routes),
        policy=policy,
        upstream=upstream,
        resilience=resilience,
        sender=ResilientSender(resilience.plans, upstream.send, observer.retried),
        observer=observer,
        sha256=config_sha256(config),
        via=forwarding.via,
        forwarded_for=forwarding.x_forwarded_for,
        request_id=forwarding.request_id,
        body_idle_timeout=float(config.limits.body_idle_timeout),
    )


@dataclass(eq=False)
class Runtime:
    active: Snapshot
    observer: Observer
    resolve: PolicyResolve
    in_flight: int = 0
    draining: bool = False  # SIGTERM seen: not ready, still serving
    stopping: bool = False  # grace over or nothing in flight: new requests get 503 draining
    ready: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    tunnels: Tunnels | None = None  # CONNECT (and captured TLS) tunnels; set by build_runtime
    # TLS interception (its CA lives as long as the process: a reload does not change which hosts
    # are intercepted; it does change the routes their requests take). Set by build_runtime.
    interceptor: Interceptor | None = None
    # The sidecar's own bound listeners (real ports), denied by every snapshot's policy.
    listeners: list[tuple[str, int]] = field(default_factory=list)

    # The active snapshot's parts, for the admin listener, the server and tests.
    @property
    def config(self) -> Config:
        return self.active.config

    @property
    def router(self) -> Router:
        return self.active.router

    @property
    def policy(self) -> EgressPolicy:
        return self.active.policy

    @property
    def upstream(self) -> UpstreamClient:
        return self.active.upstream

    @property
    def resilience(self) -> Resilience:
        return self.active.resilience

    def activate(self, snapshot: Snapshot) -> Snapshot:
        """Make `snapshot` the one new requests use; returns the one it replaces."""
        previous, self.active = self.active, snapshot
        self.resolve.policy = snapshot.policy
        tunnels = self.tunnels
        if tunnels is not None:  # new tunnels take the new policy and settings; open ones carry on
            tunnels.policy = snapshot.policy
            tunnels.settings = TunnelSettings.from_config(snapshot.config)
        return previous

    def add_listener(self, host: str, port: int) -> None:
        """A bound listener (after port 0 is known): denied as a destination now and after reloads."""
        self.listeners.append((host, port))
        self.active.policy.add_listener(host, port)

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def is_self(self, host: str, port: int) -> bool:
        return self.active.router.is_self(host, port)

    def pool_stats(self) -> dict[str, tuple[int, int]]:
        return self.active.upstream.pool_stats()

    def abandoned_counts(self) -> dict[str, tuple[int, int]]:
        return self.active.upstream.abandoned_counts()

    def breaker_states(self) -> dict[str, str]:
        return self.active.resilience.breakers.states()


def build_runtime(config: Config, observer: Observer | None = None, contexts: TLSContexts | None = None) -> Runtime:
    observer = observer or Observer(config)
    resolve = PolicyResolve(EgressPolicy())  # replaced by the snapshot's policy below
    snapshot = build_snapshot(config, observer, resolve, contexts=contexts)
    runtime = Runtime(active=snapshot, observer=observer, resolve=resolve, interceptor=build_interceptor(config))
    resolve.policy = snapshot.policy
    tunnels = runtime.tunnels = Tunnels(
        TunnelSettings.from_config(config),
        snapshot.policy,
        observer,
        is_self=runtime.is_self,  # the active router's, after a reload too
        stopping=lambda: runtime.stopping,
        on_open=runtime.request_started,  # a tunnel holds the drain like a request
        on_close=runtime.request_finished,
    )
    metrics = observer.metrics
    if metrics is not None:
        metrics.watch_pools(runtime.pool_stats, config.pool.max_connections)
        metrics.watch_breakers(runtime.breaker_states)
        metrics.watch_abandoned(runtime.abandoned_counts)
        metrics.watch_tunnels(lambda: tunnels.active)
        metrics.config_loaded(snapshot.sha256)
    runtime.idle.set()
    return runtime
