"""The data-path ASGI app: route -> policy -> build request -> send -> relay the raw response.

Streaming both ways: the request body goes upstream as it arrives, the response body comes
back as raw bytes (no decompression, no re-chunking of content). When the app goes away the
upstream response is closed at once, which gives its pool slot back. Every error before the
response head goes out becomes an error response (errors.py); a failure after it aborts the
response, so the app sees a truncated body, never a silently short one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from sidecar.errors import ClientDisconnected, EgressError, classify, error_head
from sidecar.headers import (
    body_framing,
    downstream_response_headers,
    is_upgrade,
    new_request_id,
    request_id_of,
    upstream_request_headers,
)
from sidecar.observe import Exchange
from sidecar.policy import PolicyDenied
from sidecar.resilience import send_resilient
from sidecar.runtime import Runtime
from sidecar.shedding import Gate

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_EMPTY_BODY = httpx.ByteStream(b"")
_LOCALHOST = b"127.0.0.1"


class RequestBody(httpx.AsyncByteStream):
    """The app's request body, read from ASGI `receive` as it arrives (never buffered whole)."""

    __slots__ = ("_receive", "size")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the app closed its connection while sending the body")
            chunk = message.get("body", b"")
            if chunk:
                self.size += len(chunk)
                yield chunk
            if not message.get("more_body", False):
                return


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _url(target_parts: Any) -> httpx.URL:
    # The app's raw path and query, exactly as sent: build httpx's parsed form directly so
    # nothing is re-parsed or re-quoted (httpx would percent-encode some bytes).
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = target_parts
    return url


def build_request(
    method: str,
    url: httpx.URL,
    headers: list[tuple[bytes, bytes]],
    stream: httpx.AsyncByteStream,
    extensions: dict[str, Any],
) -> httpx.Request:
    """An `httpx.Request` without re-normalising what the server already normalised.

    uvicorn hands header names lower-cased as bytes and the header rules only add lower-case
    names, so httpx's per-header normalisation (about 5 µs a request) would change nothing.
    """
    request = httpx.Request.__new__(httpx.Request)
    request.method = method
    request.url = url
    request_headers = httpx.Headers.__new__(httpx.Headers)
    request_headers._list = [(name, name, value) for name, value in headers]
    request_headers._encoding = None
    request.headers = request_headers
    request.extensions = extensions
    request.stream = stream
    return request


class ForwardApp:
    """Raw ASGI app for the data listener."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        forwarding = runtime.config.forwarding
        self.via = forwarding.via
        self.forwarded_for = forwarding.x_forwarded_for
        self.request_id = forwarding.request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served (ws="none")
        runtime = self.runtime
        exchange = Exchange(start=time.perf_counter(), method=scope["method"], path=scope["path"])
        runtime.request_started()
        runtime.observer.started(exchange)
        try:
            await self._proxy(scope, receive, send, exchange)
        finally:
            exchange.end = time.perf_counter()
            if exchange.request_id is None:  # refused before the id was read: log the app's id anyway
                exchange.request_id = request_id_of(scope["headers"])
            runtime.request_finished()
            runtime.observer.finished(exchange)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        runtime = self.runtime
        headers = scope["headers"]
        body: RequestBody | None = None
        gate: Gate | None = None
        response: httpx.Response | None = None
        try:
            if runtime.stopping:
                raise EgressError("draining", "shutting down")
            if scope["method"] == "CONNECT" or is_upgrade(headers):
                raise EgressError("unsupported", "protocol upgrade requested")
            target = runtime.router.resolve(scope)
            route = target.route
            exchange.route = route.name if route is not None else "-"
            exchange.upstream = f"{target.host}:{target.port}"
            exchange.path = target.path
            runtime.policy.check_target(target)
            # Load shedding: past max_in_flight (global or the route's), 503 overloaded at once.
            gate = runtime.resilience.shedding.gate(route.name if route is not None else None).enter()
            has_body, chunked = body_framing(headers)
            request_id = request_id_of(headers)
            added_id = None
            if request_id is None and self.request_id:
                request_id = added_id = new_request_id()
            exchange.request_id = request_id
            upstream_headers = upstream_request_headers(
                headers,
                target.host_header,
                route.injected_headers if route is not None else (),
                chunked=chunked,
                via=self.via,
                forwarded_for=_LOCALHOST if self.forwarded_for else None,
                request_id=added_id,
            )
            extensions: dict[str, Any] = {
                "timeout": route.timeouts if route is not None else runtime.router.default_timeouts
            }
            trace = runtime.observer.trace_for(exchange)
            if trace is not None:
                extensions["trace"] = trace
            if has_body:
                body = RequestBody(receive)
            request = build_request(
                scope["method"],
                _url(target.url_parts()),
                upstream_headers,
                body if body is not None else _EMPTY_BODY,
                extensions,
            )
            response = await send_resilient(runtime, request, route, exchange.mark_sent)
            exchange.headers = time.perf_counter()
        except ClientDisconnected as exc:
            exchange.kind, exchange.status, exchange.detail = "client_disconnected", 499, str(exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure before the head goes out becomes an error response
            kind = classify(exc)
            subject = exc.subject if isinstance(exc, EgressError) else None
            if isinstance(exc, PolicyDenied):
                exchange.reason = exc.reason
            retry_after = exc.retry_after if isinstance(exc, EgressError) else None
            await self._send_error(send, exchange, kind, str(exc), subject, retry_after)
            return
        finally:
            if body is not None:
                exchange.bytes_in = body.size
            if gate is not None and response is None:
                gate.leave()
        try:
            await self._relay(response, receive, send, exchange)
        finally:
            if gate is not None:
                gate.leave()

    async def _relay(self, response: httpx.Response, receive: Receive, send: Send, exchange: Exchange) -> None:
        """Stream the upstream response to the app; stop reading upstream if the app goes away."""
        exchange.status = response.status_code
        extensions = response.extensions
        exchange.reused = extensions.get("egress.reused")
        stream = response.stream
        task = asyncio.current_task()
        assert task is not None
        disconnected = False

        def on_disconnect(watcher: asyncio.Future[None]) -> None:
            nonlocal disconnected
            if not watcher.cancelled() and watcher.exception() is None:
                disconnected = True
                task.cancel()

        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        length_header = response.headers.get("content-length")
        remaining = int(length_header) if length_header is not None and length_header.isdigit() else -1
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": downstream_response_headers(response.headers.raw),
                }
            )
            exchange.response_started = True
            sent = 0
            finished = False
            async for chunk in stream:  # type: ignore[union-attr]
                sent += len(chunk)
                # With a known length, the last chunk closes the response in the same write.
                last = remaining >= 0 and sent >= remaining
                if last:
                    watcher.remove_done_callback(on_disconnect)
                    watcher.cancel()
                exchange.bytes_out = sent
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                finished = last
            if not finished:
                watcher.remove_done_callback(on_disconnect)
                watcher.cancel()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
            task.uncancel()
            exchange.kind, exchange.detail = "client_disconnected", "the app went away mid-response"
        except Exception as exc:  # noqa: BLE001 - any failure now can only abort the response
            # The head is out: abort (return without completing), so uvicorn closes the
            # connection and the app sees a truncated body rather than a short one.
            exchange.kind, exchange.detail = classify(exc), f"after response start: {exc}"
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            await stream.aclose()  # type: ignore[union-attr]

    async def _send_error(
        self, send: Send, exchange: Exchange, kind: str, detail: str, subject: str | None,
        retry_after: int | None = None,
    ) -> None:
        status, headers, body = error_head(kind, subject, retry_after)
        exchange.kind, exchange.status, exchange.detail = kind, status, detail
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError:
            pass  # the app is gone; the log line and metric still record the error
