"""The admin listener: /metrics, /healthz, /readyz, /config, /destinations."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sidecar import config as config_module
from sidecar.proxy.credentials import redact
from sidecar.runtime import Runtime

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

Handler = Callable[[Scope], Awaitable[tuple[int, bytes, bytes]]]

def redacted_config(runtime: Runtime) -> dict[str, Any]:
    """The effective config for display: literal injected header values hidden (credentials.redact)."""
    return redact(config_module.to_builtins(runtime.config))


class AdminApp:
    """Raw ASGI app for the admin listener."""

    def __init__(self, runtime: Runtime, extra: dict[str, Handler] | None = None) -> None:
        self.runtime = runtime
        self.handlers: dict[str, Handler] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/config": self._config,
            "/destinations": self._destinations,
            **({"/metrics": self._metrics} if runtime.observer.metrics is not None else {}),
            **(extra or {}),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        handler = self.handlers.get(scope["path"])
        if handler is None:
            status, content_type, body = 404, b"text/plain; charset=utf-8", b"not found\n"
        elif scope["method"] not in ("GET", "HEAD"):
            status, content_type, body = 405, b"text/plain; charset=utf-8", b"method not allowed\n"
        else:
            status, content_type, body = await handler(scope)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})

    async def _healthz(self, scope: Scope) -> tuple[int, bytes, bytes]:
        return 200, b"text/plain; charset=utf-8", b"ok\n"

    async def _readyz(self, scope: Scope) -> tuple[int, bytes, bytes]:
        runtime = self.runtime
        if runtime.draining:
            return 503, b"text/plain; charset=utf-8", b"draining\n"
        if not runtime.ready:
            return 503, b"text/plain; charset=utf-8", b"starting\n"
        if runtime.interceptor is not None:
            problem = runtime.interceptor.unready()
            if problem is not None:
                # The app containers wait (startup probe) for the CA bundle their trust env names.
                return 503, b"text/plain; charset=utf-8", problem.encode() + b"\n"
        return 200, b"text/plain; charset=utf-8", b"ready\n"

    async def _config(self, scope: Scope) -> tuple[int, bytes, bytes]:
        """The active config (after the last applied reload) and, first, its sha256 (egress_config_info)."""
        shown = {"sha256": self.runtime.active.sha256, **redacted_config(self.runtime)}
        body = json.dumps(shown, indent=2, sort_keys=True).encode() + b"\n"
        return 200, b"application/json", body

    async def _destinations(self, scope: Scope) -> tuple[int, bytes, bytes]:
        """The egress inventory (sidecar.observe.inventory): what `suggest-policy` reads."""
        body = json.dumps(self.runtime.observer.inventory.snapshot(), indent=1).encode() + b"\n"
        return 200, b"application/json", body

    async def _metrics(self, scope: Scope) -> tuple[int, bytes, bytes]:
        metrics = self.runtime.observer.metrics
        assert metrics is not None
        accept = b""
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value
                break
        content_type, body = metrics.exposition(accept.decode("latin-1"))
        return 200, content_type, body
