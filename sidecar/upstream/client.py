"""The upstream client stack, built in this one module so it can be replaced in one place.

ONE `httpx.AsyncClient` for the process, made at start and closed at stop. It owns the
default pool. A route whose TLS settings or HTTP version differ from the default gets its own
pool (an `ssl.SSLContext` and the HTTP/2 switch belong to a pool in httpcore), created once at
start (HTTP/1.1 or HTTP/2, both our own transports in sidecar/upstream/transport/) and closed with the
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

import functools
import http.cookiejar
import os
import ssl
from collections.abc import Callable, Sequence

import httpx
import structlog

from sidecar.config import TLS, Config, Retries
from sidecar.proxy.routing import CompiledRoute
from sidecar.upstream.tls import TLSContexts, default_pool, route_pool
from sidecar.upstream.transport import H2Transport, HTTP11Transport, Resolve

log = structlog.get_logger("egress.upstream")


class _NoCookies(http.cookiejar.CookieJar):
    """A jar that stores nothing: no cookie ever crosses from one call to another."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def extract_cookies(self, response: object, request: object) -> None:
        return None


Pool = HTTP11Transport | H2Transport
RetryCounter = Callable[[str, str], None]


def _count_replay(on_retry: RetryCounter, request: httpx.Request, reason: str) -> None:
    """An HTTP/2 transport sent a request again by itself (GOAWAY, REFUSED_STREAM): count it for
    the request's route, as the resilience layer counts its retries."""
    on_retry(request.extensions.get("egress.route", "-"), reason)


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


class UpstreamClient:
    """Owns the one AsyncClient and the per-route pools; `send` is the hot path."""

    def __init__(self, config: Config, routes: Sequence[CompiledRoute], resolve: Resolve | None = None,
                 contexts: TLSContexts | None = None, previous: UpstreamClient | None = None,
                 on_retry: RetryCounter | None = None) -> None:
        self.config = config
        self.resolve = resolve
        # Called as (route, reason) when a transport sends a request again by itself (HTTP/2
        # streams refused by GOAWAY or REFUSED_STREAM): the observer's retry count.
        self.on_retry = on_retry
        self.contexts = contexts or TLSContexts()  # contexts started early (sidecar.upstream.tls), else built here
        # A reload keeps each pool whose settings and certificate files are unchanged (its open
        # connections with it); any other is built anew and the old one is retired (`retired`).
        self._previous = previous._by_key if previous is not None else {}
        self._by_key: dict[tuple[object, ...], Pool] = {}
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
        self.route_transports: dict[str, Pool] = {}
        for route in routes:
            settings = route_pool(route.config, config)
            if settings is None:
                continue
            self.route_transports[route.name] = self._pool(("route", route.name), *settings, route.config.retries)
            tls = route.config.tls
            if tls is not None and tls.insecure_skip_verify:
                log.warning(f"route {route.name}: TLS verification is OFF (insecure_skip_verify)", route=route.name)
        if config.tls.insecure_skip_verify:
            log.warning("TLS verification is OFF for forward-proxy destinations (tls.insecure_skip_verify)")

    def _pool(self, name: tuple[str, ...], tls: TLS, http2: bool, retries: Retries | None = None) -> Pool:
        # HTTP/2 pools keep request bodies for replays up to the route's retries.max_body_bytes.
        replay_body_bytes = (retries or Retries()).max_body_bytes
        key = (*name, tls, http2, self.config.pool, tls_files_key(tls), replay_body_bytes)
        transport = self._previous.get(key)
        if transport is None:
            transport = self._transport(tls, http2, replay_body_bytes)
        self._by_key[key] = transport
        return transport

    def retired(self, previous: UpstreamClient) -> list[Pool]:
        """The pools of `previous` this one did not keep: close them once their requests are done."""
        kept = {id(transport) for transport in self._by_key.values()}
        self._previous = {}
        return [transport for transport in previous._by_key.values() if id(transport) not in kept]

    def _transport(self, tls: TLS, http2: bool, replay_body_bytes: int) -> Pool:
        # A context per pool, made when the pool is: a bad CA file stops start-up (or a reload).
        context = self.contexts.get(tls, http2)
        if not http2:
            # HTTP/1.1 pools: our own transport (sidecar/upstream/transport/), dialling through `resolve`.
            return self._http11(context)
        # HTTP/2 pools: the same connect path and limits. Origins whose server selects
        # http/1.1 (ALPN) get an HTTP/1.1 transport of the pool's own, built at the first one.
        pool = self.config.pool
        return H2Transport(
            context,
            lambda: self._http11(self.contexts.get(tls, False)),
            max_connections=pool.max_connections,
            keepalive_expiry=float(pool.keepalive_expiry),
            resolve=self.resolve,
            replay_body_bytes=replay_body_bytes,
            on_replay=functools.partial(_count_replay, self.on_retry) if self.on_retry is not None else None,
        )

    def _http11(self, context: ssl.SSLContext) -> HTTP11Transport:
        pool = self.config.pool
        return HTTP11Transport(
            context,
            max_connections=pool.max_connections,
            max_idle=pool.max_keepalive_connections,
            keepalive_expiry=float(pool.keepalive_expiry),
            resolve=self.resolve,
        )

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
        """(kept, closed) per pool: connections whose app went away after the request was given
        one, read to the end and kept (salvaged) or closed. On HTTP/2 only the stream is reset:
        its connection counts as kept."""
        counts: dict[str, tuple[int, int]] = {}
        for name, transport in (("default", self.default_transport), *self.route_transports.items()):
            counts[name] = transport.connections_abandoned
        return counts

    async def aclose(self) -> None:
        for transport in self.route_transports.values():
            await transport.aclose()
        await self.client.aclose()  # closes the default transport and its connections
