"""The webhook's raw ASGI app: POST /mutate, POST /mutate/namespace, GET /healthz, GET /metrics.

Two paths because an AdmissionReview does not carry namespace labels: the chart registers two
webhook entries, one whose namespaceSelector matches opted-in namespaces (-> /mutate/namespace)
and one whose objectSelector matches opted-in pods elsewhere (-> /mutate). The path the API
server calls tells the pure patch function whether the namespace opted in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from sidecar.inject.review import Reply, handle
from sidecar.inject.settings import Settings
from sidecar.observe import log as log_module

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The API server caps a request at 3 MiB (etcd's limit is 1.5 MiB per object; a review may carry
# object and oldObject); past this the body cannot be a real AdmissionReview.
MAX_BODY = 4 * 1024 * 1024
_MUTATE_PATHS = {"/mutate": False, "/mutate/namespace": True}


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes, error_kind: str | None = None
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if error_kind is not None:
        headers.append((b"x-egress-error", error_kind.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_app(settings: Settings) -> ASGIApp:
    """Build the ASGI callable around one immutable Settings."""
    registry = CollectorRegistry()
    reviews = Counter(
        "egress_injector_reviews", "AdmissionReviews answered, by outcome", ["outcome"], registry=registry
    )
    for outcome in ("injected", "skipped", "denied", "bad_request", "internal"):
        reviews.labels(outcome)  # export zeros so rate() works from the first scrape
    log = log_module.get("egress_sidecar.inject")
    text = b"text/plain; charset=utf-8"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan off; nothing else is served
            return
        path, method = scope["path"], scope["method"]
        if path in ("/healthz", "/metrics"):
            if method not in ("GET", "HEAD"):
                await _respond(send, 405, b"method not allowed\n", text, "bad_request")
            elif path == "/healthz":
                await _respond(send, 200, b"ok\n", text)
            else:
                await _respond(send, 200, generate_latest(registry), CONTENT_TYPE_LATEST.encode())
            return
        if path not in _MUTATE_PATHS:
            await _respond(send, 404, b"not found\n", text, "no_route")
            return
        if method != "POST":
            await _respond(send, 405, b"method not allowed: POST an AdmissionReview\n", text, "bad_request")
            return
        try:
            body = await _read_body(receive)
        except _TooLarge:
            reviews.labels("bad_request").inc()
            log.warning("admission", outcome="bad_request", detail="body too large")
            await _respond(send, 413, b"body too large for an AdmissionReview\n", text, "bad_request")
            return
        except ConnectionError:
            return
        try:
            reply: Reply = handle(body, settings, namespace_opted_in=_MUTATE_PATHS[path])
        except Exception:  # never crash the webhook: a bug answers 500 and the failurePolicy decides
            reviews.labels("internal").inc()
            log.exception("admission", outcome="internal")
            await _respond(send, 500, b"internal error in the injector\n", text, "internal")
            return
        reviews.labels(reply.outcome).inc()
        log.info("admission", outcome=reply.outcome, detail=reply.detail, pod=reply.pod, path=path)
        if reply.status == 200:
            await _respond(send, 200, reply.body, b"application/json")
        else:
            await _respond(send, reply.status, reply.body, text, reply.outcome)

    return app
