"""The upstream client stack, built in this one module so it can be replaced in one place.

ONE `httpx.AsyncClient` for the process, made at start and closed at stop. It owns the
default pool. A route whose TLS settings or HTTP version differ from the default gets its own
pool (an `ssl.SSLContext` and the HTTP/2 switch belong to a pool in httpcore), created once at
start (an HTTP/2 pool's transport at its first request: _DeferredTransport) and closed with the
client.

The hot path does not call `client.send`: it hands an `httpx.Request` to the transport's
`handle_async_request`. That skips, by construction, what a proxy must not do: the client's
cookie jar (a shared jar would replay tenant A's Set-Cookie on tenant B's calls), redirect
following (a 3xx goes back to the app as is), auth, event hooks and the client's default
headers (User-Agent, Accept, Accept-Encoding). The client is still configured as if it were
used directly (no env proxies, no redirects, a jar that keeps nothing, no default headers),
so nothing changes if someone does call it.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from sidecar.config import TLS, Config
from sidecar.routing import CompiledRoute
from sidecar.tls import TLSContexts, default_pool, route_pool
from sidecar.transport import HTTP11Transport, Resolve

log = logging.getLogger("egress.upstream")


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that stores nothing: no cookie ever crosses from one call to another."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: object, request: object) -> None:
        return None


class _DeferredTransport(httpx.AsyncBaseTransport):
    """An HTTP/2 pool: httpx's stock transport, built at the pool's first request.

    It needs httpcore, which brings h11, h2, hpack, hyperframe and anyio: ~25 ms of imports and
    ~2 MiB that the sidecar does not pay before it is ready, nor at all while no request takes
    an HTTP/2 route. Building it does no I/O and no await, so concurrent first requests cannot
    build two. Its TLS context is made at start with the others.
    """

    def __init__(self, build: Callable[[], httpx.AsyncBaseTransport]) -> None:
        self._build = build
        self._inner: httpx.AsyncBaseTransport | None = None
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        inner = self._inner
        if inner is None:
            inner = self._inner = self._build()
        # Never cancel httpcore's HTTP/2 exchange half-way: httpcore and h2 each count a
        # connection's open streams, and a request cancelled while httpcore waits for its write
        # lock is released by the one and still counted by the other (encode/httpcore#1022).
        # After enough apps went away mid-request, every request on that connection failed with
        # "Max outbound streams is 128, 128 open" (186 such 502s in one c256 bench run). So the
        # exchange runs in its own task; a caller that is cancelled leaves it to finish (bounded
        # by the request's own timeouts) and its response is closed as soon as it comes.
        exchange = asyncio.ensure_future(inner.handle_async_request(request))
        try:
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            self._abandoned.add(exchange)
            exchange.add_done_callback(self._close_abandoned)
            raise

    def _close_abandoned(self, exchange: asyncio.Future[httpx.Response]) -> None:
        self._abandoned.discard(exchange)
        if exchange.cancelled() or exchange.exception() is not None:
            return  # nobody to tell: the app is gone (retrieving the error keeps asyncio quiet)
        closing = asyncio.ensure_future(exchange.result().aclose())
        self._abandoned.add(closing)
        closing.add_done_callback(self._abandoned.discard)

    def pool_stats(self) -> tuple[int, int]:
        """(active, idle), read through httpcore's pool (`_pool.connections`, `is_idle()`/`is_closed()`)."""
        if self._inner is None:
            return 0, 0
        connections = self._inner._pool.connections  # type: ignore[attr-defined]
        idle = sum(1 for c in connections if c.is_idle())
        closed = sum(1 for c in connections if c.is_closed())
        return len(connections) - idle - closed, idle

    async def aclose(self) -> None:
        for pending in list(self._abandoned):
            pending.cancel()
        if self._inner is not None:
            await self._inner.aclose()


def tls_files_key(tls: TLS) -> tuple[tuple[int, int, int, int] | None, ...]:
    """What identifies the contents of a pool's CA and client certificate files (stat, following
    links, as credentials.SecretFile does): a file replaced, or a kubelet `..data` swap, changes it."""
    keys: list[tuple[int, int, int, int] | None] = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        keys.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns) if stat is not None else None)
    return tuple(keys)


class Upstream:
    """Owns the one AsyncClient and the per-route pools; `send` is the hot path."""

    def __init__(self, config: Config, routes: Sequence[CompiledRoute], resolve: Resolve | None = None,
                 contexts: TLSContexts | None = None, previous: Upstream | None = None) -> None:
        self.config = config
        self.resolve = resolve
        self.contexts = contexts or TLSContexts()  # contexts started early (sidecar.tls), else built here
        # A reload keeps each pool whose settings and certificate files are unchanged (its open
        # connections with it); any other is built anew and the old one is retired (`retired`).
        self._previous = previous._by_key if previous is not None else {}
        self._by_key: dict[tuple[object, ...], HTTP11Transport | _DeferredTransport] = {}
        self.default_transport = self._pool(("default",), *default_pool(config))
        self.client = httpx.AsyncClient(
            transport=self.default_transport,
            cookies=httpx.Cookies(_NoCookies()),
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(
                connect=float(config.timeouts.connect),
                read=float(config.timeouts.read),
                write=float(config.timeouts.write),
                pool=float(config.timeouts.pool),
            ),
        )
        self.client.headers.clear()  # no User-Agent / Accept / Accept-Encoding of httpx's own
        self.route_transports: dict[str, HTTP11Transport | _DeferredTransport] = {}
        for route in routes:
            settings = route_pool(route.config, config)
            if settings is None:
                continue
            self.route_transports[route.name] = self._pool(("route", route.name), *settings)
            tls = route.config.tls
            if tls is not None and tls.insecure_skip_verify:
                log.warning("route %s: TLS verification is OFF (insecure_skip_verify)", route.name)
        if config.tls.insecure_skip_verify:
            log.warning("TLS verification is OFF for forward-proxy destinations (tls.insecure_skip_verify)")

    def _pool(self, name: tuple[str, ...], tls: TLS, http2: bool) -> HTTP11Transport | _DeferredTransport:
        key = (*name, tls, http2, self.config.pool, tls_files_key(tls))
        transport = self._previous.get(key)
        if transport is None:
            transport = self._transport(tls, http2)
        self._by_key[key] = transport
        return transport

    def retired(self, previous: Upstream) -> list[HTTP11Transport | _DeferredTransport]:
        """The pools of `previous` this one did not keep: close them once their requests are done."""
        kept = {id(transport) for transport in self._by_key.values()}
        self._previous = {}
        return [transport for transport in previous._by_key.values() if id(transport) not in kept]

    def _transport(self, tls: TLS, http2: bool) -> HTTP11Transport | _DeferredTransport:
        pool = self.config.pool
        if not http2:
            # HTTP/1.1 pools use our own transport (sidecar/transport/): same httpx API, a
            # fraction of httpcore's CPU per request. It also dials through `resolve`.
            return HTTP11Transport(
                self.contexts.get(tls, http2),
                max_connections=pool.max_connections,
                max_idle=pool.max_keepalive_connections,
                keepalive_expiry=float(pool.keepalive_expiry),
                resolve=self.resolve,
            )
        context = self.contexts.get(tls, http2)  # at start, like every pool's: a bad CA file stops start-up
        return _DeferredTransport(lambda: self._stock_transport(context))

    def _stock_transport(self, context: ssl.SSLContext) -> httpx.AsyncBaseTransport:
        from sidecar import httpcore_surplus
        from sidecar.guard import guard_transport  # imports httpcore (see _DeferredTransport)

        httpcore_surplus.install()  # HTTP/1.1 fallback: no reuse after surplus bytes

        pool = self.config.pool
        transport = httpx.AsyncHTTPTransport(
            verify=context,
            http1=True,
            http2=True,
            limits=httpx.Limits(
                max_connections=pool.max_connections,
                max_keepalive_connections=pool.max_keepalive_connections,
                keepalive_expiry=float(pool.keepalive_expiry),
            ),
            trust_env=False,
            retries=0,
        )
        # The connect guard: every new connection dials only addresses the policy checked.
        return guard_transport(transport, self.resolve) if self.resolve is not None else transport

    def transport_for(self, route: CompiledRoute | None) -> httpx.AsyncBaseTransport:
        if route is not None:
            return self.route_transports.get(route.name, self.default_transport)
        return self.default_transport

    async def send(self, request: httpx.Request, route: CompiledRoute | None) -> httpx.Response:
        """Send one request; the response body is not read (the caller streams it)."""
        return await self.transport_for(route).handle_async_request(request)

    def transports(self) -> list[httpx.AsyncBaseTransport]:
        return [self.default_transport, *self.route_transports.values()]

    def pool_stats(self) -> dict[str, tuple[int, int]]:
        """(active, idle) connections per pool ("default" or the route's name), read from the pools now."""
        stats: dict[str, tuple[int, int]] = {}
        for name, transport in (("default", self.default_transport), *self.route_transports.items()):
            stats[name] = transport.pool_stats()
        return stats

    def abandoned_counts(self) -> dict[str, tuple[int, int]]:
        """(kept, closed) per pool of our own transport: connections whose app went away after
        the request was given one, read to the end and kept (salvaged) or closed. httpx's
        stock transport (HTTP/2 routes) keeps no such count and is left out."""
        counts: dict[str, tuple[int, int]] = {}
        for name, transport in (("default", self.default_transport), *self.route_transports.items()):
            if isinstance(transport, HTTP11Transport):
                counts[name] = transport.connections_abandoned
        return counts

    async def aclose(self) -> None:
        for transport in self.route_transports.values():
            await transport.aclose()
        await self.client.aclose()  # closes the default transport and its connections
