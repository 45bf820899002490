"""The data-path ASGI app: route -> policy -> build request -> send -> relay the raw response.

Streaming both ways: the request body goes upstream as it arrives, the response body comes
back as raw bytes (no decompression, no re-chunking of content). When the app goes away the
request is cancelled at once: the transport then reads the small rest of an upstream
response that was already asked for and keeps the connection (transport/salvage.py, at most
64 KiB and 1 s), else closes it; either way its pool slot comes back. Every error before the
response head goes out becomes an error response (errors.py); a failure after it aborts the
response, so the app sees a truncated body, never a silently short one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from sidecar._compat.httpx import build_request
from sidecar.errors import ClientDisconnected, EgressError, classify, error_head, error_subject
from sidecar.exchange import Exchange
from sidecar.ingress.framing import request_framing
from sidecar.ingress.writer import BODY_READY, ProxyCycle
from sidecar.policy.egress import PolicyDenied
from sidecar.proxy.headers import (
    downstream_response_headers,
    is_upgrade,
    new_request_id,
    request_id_of,
    upstream_request_headers,
)
from sidecar.proxy.routing import INTERCEPTED, Target
from sidecar.resilience.shedding import Gate
from sidecar.runtime import Runtime, Snapshot

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_EMPTY_BODY = httpx.ByteStream(b"")
_LOCALHOST = b"127.0.0.1"


class RequestBody(httpx.AsyncByteStream):
    """The app's request body, read from ASGI `receive` as it arrives (never buffered whole).

    A client that sends no body bytes for `idle_timeout` while the sidecar waits for them
    gets 408 `client_timeout` (the upstream sees an incomplete body and a closed connection).
    Only the wait inside `receive` counts: while the upstream is slow to take the body,
    uvicorn stops reading from the client, and that silence is not the client's. The
    response cannot have started by then (httpcore sends the whole body before it reads the
    response, HTTP/1.1 and HTTP/2 alike); were it to, _relay's abort path would apply.
    """

    __slots__ = ("_idle_timeout", "_on_end", "_receive", "size")

    def __init__(self, receive: Receive, idle_timeout: float, on_end: Callable[[], None]) -> None:
        self._receive = receive
        self._idle_timeout = idle_timeout
        self._on_end = on_end  # called once the whole body is in: receive() is free for the watch
        self.size = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout):
                    message = await self._receive()
            except TimeoutError:
                raise EgressError(
                    "client_timeout", f"no request body bytes for {self._idle_timeout:g}s"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the app closed its connection while sending the body")
            chunk = message.get("body", b"")
            if chunk:
                self.size += len(chunk)
                yield chunk
            if not message.get("more_body", False):
                self._on_end()
                return


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """Cancels the request's task when the app goes away, so the upstream side is let go at once.

    Started once the request body is fully read (before that, RequestBody sees the
    disconnect itself), it covers the wait for the upstream's headers as well as the relay:
    an app that gives up on a slow upstream frees the upstream connection and its pool slot
    then (after the salvage's bound at most), not at the read timeout.

    On the data listener's own protocol the cycle calls us when the connection is lost
    (cycle.ProxyCycle.on_disconnect): no extra task per request. Under another server (h11)
    a watcher task waits on `receive()` instead; it is stopped before the sidecar's last
    write of a response, as uvicorn's receive() also returns http.disconnect once a response
    is complete.
    """

    __slots__ = ("_cycle", "_receive", "_task", "_watcher", "seen")

    def __init__(self, receive: Receive, cycle: ProxyCycle | None) -> None:
        self._receive = receive
        self._cycle = cycle
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Future[None] | None = None
        self.seen = False

    def start(self) -> None:
        if self._task is not None:
            return
        self._task = asyncio.current_task()
        cycle = self._cycle
        if cycle is not None:
            if cycle.disconnected:
                self._disconnected()  # gone already: the next await raises CancelledError
            else:
                cycle.on_disconnect = self._disconnected
            return
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(self._receive))
        self._watcher.add_done_callback(self._on_done)

    def _disconnected(self) -> None:
        if self._task is not None:
            self.seen = True
            self._task.cancel()

    def _on_done(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            self._disconnected()

    def stop(self) -> None:
        if self._cycle is not None:
            self._cycle.on_disconnect = None
        elif self._watcher is not None:
            self._watcher.remove_done_callback(self._on_done)
            self._watcher.cancel()

    def absorb(self) -> bool:
        """After a CancelledError: True (and the cancellation undone) if the app's going away caused it."""
        if not self.seen:
            return False
        task = asyncio.current_task()
        assert task is not None
        task.uncancel()
        return True


class ForwardApp:
    """Raw ASGI app for the data listener."""

    def __init__(self, runtime: Runtime, resolve: Callable[[Scope], Target] | None = None) -> None:
        self.runtime = runtime
        # scope -> Target: the transparent listener's (transparent.py), or None: the active router's.
        self.resolve = resolve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served (ws="none")
        runtime = self.runtime
        # The config this request runs under, to its end, whatever a reload does meanwhile.
        active = runtime.active
        exchange = Exchange(start=time.perf_counter(), method=scope["method"], path=scope["path"])
        if INTERCEPTED in scope:
            exchange.intercepted = True
        runtime.request_started()
        active.in_flight += 1
        runtime.observer.started(exchange)
        try:
            await self._proxy(scope, receive, send, exchange, active)
        finally:
            exchange.end = time.perf_counter()
            if exchange.request_id is None:  # refused before the id was read: log the app's id anyway
                exchange.request_id = request_id_of(scope["headers"])
            active.in_flight -= 1
            runtime.request_finished()
            runtime.observer.finished(exchange)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange, active: Snapshot) -> None:
        runtime = self.runtime
        headers = scope["headers"]
        body: RequestBody | None = None
        cycle = getattr(send, "__self__", None)  # see cycle.py: `send` is our cycle's own method
        watch = DisconnectWatch(receive, cycle if isinstance(cycle, ProxyCycle) else None)
        gate: Gate | None = None
        response: httpx.Response | None = None
        try:
            if runtime.stopping:
                raise EgressError("draining", "shutting down")
            if scope["method"] == "CONNECT" or is_upgrade(headers):
                raise EgressError("unsupported", "protocol upgrade requested")
            # Before routing: a request whose end is in doubt is refused whatever it asks for.
            has_body, chunked, content_length = request_framing(headers, scope["http_version"])
            target = active.router.resolve(scope) if self.resolve is None else self.resolve(scope)
            route = target.route
            exchange.route = route.name if route is not None else "-"
            exchange.upstream = target.endpoint
            exchange.path = target.path
            if route is None and target.host in active.policy.identity_hosts:  # policy.metadata: identity
                active.policy.check_identity(target, scope["method"], target.path, headers)
            else:
                exchange.would_deny = active.policy.check_target(target)
            # Load shedding: past max_in_flight (global or the route's), 503 overloaded at once.
            gate = active.resilience.shedding.gate(route.name if route is not None else None).enter()
            request_id = request_id_of(headers)
            added_id = None
            if request_id is None and active.request_id:
                request_id = added_id = new_request_id()
            exchange.request_id = request_id
            upstream_headers = upstream_request_headers(
                headers,
                target.host_header,
                route.injected_headers if route is not None else (),
                chunked=chunked,
                content_length=content_length,
                via=active.via,
                forwarded_for=_LOCALHOST if active.forwarded_for else None,
                request_id=added_id,
            )
            extensions: dict[str, Any] = {
                "timeout": route.timeouts if route is not None else active.router.default_timeouts,
                "egress.route": exchange.route,  # for counts the transport keeps (HTTP/2 replays)
            }
            trace = runtime.observer.trace_for(exchange)
            if trace is not None:
                extensions["trace"] = trace
            if has_body:
                body = RequestBody(receive, active.body_idle_timeout, watch.start)
            else:
                watch.start()
            request = build_request(
                scope["method"],
                target.url(),
                upstream_headers,
                body if body is not None else _EMPTY_BODY,
                extensions,
            )
            response = await active.sender.send(request, route, exchange.mark_sent)
            exchange.headers = time.perf_counter()
        except asyncio.CancelledError:
            watch.stop()
            if not watch.absorb():
                raise
            exchange.kind, exchange.status = "client_disconnected", 499
            exchange.detail = "the app went away before the response headers"
            return
        except ClientDisconnected as exc:
            watch.stop()
            exchange.kind, exchange.status, exchange.detail = "client_disconnected", 499, str(exc)
            return
        except Exception as exc:  # noqa: BLE001 - every failure before the head goes out becomes an error response
            watch.stop()
            if watch.absorb():  # the app left at the same moment: nobody to answer
                exchange.kind, exchange.status, exchange.detail = "client_disconnected", 499, str(exc)
                return
            kind = classify(exc)
            subject = error_subject(exc)
            if isinstance(exc, PolicyDenied):
                exchange.reason = exc.reason
                exchange.would_deny = None  # refused after all (address rules at connect): a denial
            retry_after = exc.retry_after if isinstance(exc, EgressError) else None
            await self._send_error(send, exchange, kind, str(exc), subject, retry_after)
            return
        finally:
            if body is not None:
                exchange.bytes_in = body.size
            if gate is not None and response is None:
                gate.leave()
        try:
            await self._relay(response, watch, send, exchange)
        finally:
            if gate is not None:
                gate.leave()

    async def _relay(self, response: httpx.Response, watch: DisconnectWatch, send: Send, exchange: Exchange) -> None:
        """Stream the upstream response to the app; stop reading upstream if the app goes away."""
        exchange.status = response.status_code
        extensions = response.extensions
        exchange.reused = extensions.get("egress.reused")
        stream = response.stream
        watch.start()  # a no-op, unless the upstream answered before taking the whole body
        length_header = response.headers.get("content-length")
        remaining = int(length_header) if length_header is not None and length_header.isdigit() else -1
        start: dict[str, Any] = {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": downstream_response_headers(response.headers.raw),
        }
        body_ready = getattr(stream, "body_ready", None)
        if body_ready is not None and body_ready():
            start[BODY_READY] = True  # head and first chunk in one write (cycle.py)
        try:
            await send(start)
            exchange.response_started = True
            sent = 0
            finished = False
            async for chunk in stream:  # type: ignore[union-attr]
                sent += len(chunk)
                # With a known length, the last chunk closes the response in the same write.
                last = remaining >= 0 and sent >= remaining
                if last:
                    watch.stop()
                exchange.bytes_out = sent
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                finished = last
            if not finished:
                watch.stop()
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            violation = getattr(stream, "violation", None)
            if violation is not None:
                # The app got the complete response; the upstream's fault is still recorded.
                exchange.kind, exchange.detail = "protocol_error", violation
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            exchange.kind, exchange.detail = "client_disconnected", "the app went away mid-response"
        except Exception as exc:  # noqa: BLE001 - any failure now can only abort the response
            watch.absorb()  # should the app also have left, its pending cancellation goes too
            # The head is out: abort (return without completing), so uvicorn closes the
            # connection and the app sees a truncated body rather than a short one.
            exchange.kind, exchange.detail = classify(exc), f"after response start: {exc}"
        finally:
            watch.stop()
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
