"""Client TLS contexts for the upstream pools: what each pool trusts and offers, built ahead of use.

One pool per distinct TLS setting and HTTP version (sidecar.upstream.client), each with its own
`ssl.SSLContext`. Building one is mostly loading its trust: certifi's bundle (the default for
destinations no route names) is ~140 PEM certificates, ~20 ms of CPU. OpenSSL parses them with
the GIL released, so `TLSContexts.start` does it in a thread right after the config is read,
overlapping the imports of the server (~150 ms); the runtime then takes each context as it
builds the pools, exactly as if it had built them itself (same settings, one context per pool,
the same exception if a file cannot be loaded).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from sidecar.config import TLS, Config, Route

Settings = tuple[TLS, bool]  # (trust and client certificate, HTTP/2 offered)


def ssl_context(tls: TLS, http2: bool) -> ssl.SSLContext:
    """A client TLS context: system trust or `ca_file`, optional client certificate (mTLS)."""
    if tls.insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=tls.ca_file) if tls.ca_file else _system_context()
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    return context


def _system_context() -> ssl.SSLContext:
    try:
        import certifi  # httpx's own default trust, when present

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi ships with httpx
        return ssl.create_default_context()


def default_pool(config: Config) -> Settings:
    """The pool for forward-proxy destinations and routes without their own TLS or HTTP version."""
    return config.tls, config.pool.http2


def route_pool(route: Route, config: Config) -> Settings | None:
    """A route's own pool settings, or None when it shares the default pool."""
    if route.tls is None and (route.http2 is None or route.http2 == config.pool.http2):
        return None
    return route.tls or config.tls, config.pool.http2 if route.http2 is None else route.http2


def pools(config: Config, routes: Sequence[Route] | None = None) -> list[Settings]:
    """The settings of every pool the upstream stack builds for `config`, default pool first."""
    own = [route_pool(route, config) for route in (config.routes if routes is None else routes)]
    return [default_pool(config), *(settings for settings in own if settings is not None)]


class TLSContexts:
    """Contexts for known pool settings, built in a background thread; `get` builds any other now."""

    def __init__(self) -> None:
        self._pending: dict[Settings, list[Future[ssl.SSLContext]]] = {}

    @classmethod
    def start(cls, config: Config) -> TLSContexts:
        """Begin building a context for every pool of `config` in a daemon thread; returns at once."""
        contexts = cls()
        work: list[tuple[Settings, Future[ssl.SSLContext]]] = []
        for settings in pools(config):
            future: Future[ssl.SSLContext] = Future()
            contexts._pending.setdefault(settings, []).append(future)
            work.append((settings, future))

        def build() -> None:
            for (tls, http2), result in work:
                try:
                    result.set_result(ssl_context(tls, http2))
                except Exception as exc:  # noqa: BLE001 - re-raised by `get`, where the pool is built
                    result.set_exception(exc)

        threading.Thread(target=build, name="tls-contexts", daemon=True).start()
        return contexts

    def get(self, tls: TLS, http2: bool) -> ssl.SSLContext:
        """A context of its own for one pool: the one built ahead if any is left, else a new one."""
        futures = self._pending.get((tls, http2))
        if futures:
            return futures.pop(0).result()
        return ssl_context(tls, http2)
