"""What one request (`Exchange`) or tunnel (`TunnelRecord`) through the sidecar was, as recorded.

The forward path (and the ingress, for requests it refuses) fills one `Exchange` per request
and hands it to the observer (observe.py) at the end; metrics and the access log read it.
A plain record on purpose: it imports nothing of the sidecar, so every layer may name it.

Timings are `time.perf_counter()` marks (0.0: not reached). The forward path sets `sent`
(request handed to the pool) and `headers` (response head received); the connection marks
come from httpx's `trace` request extension, which the transports call about eight times per
request: `Exchange.trace` is therefore a bound coroutine method that does one dict lookup
and one attribute store per event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

_now = time.perf_counter

# httpcore's trace event names ("<logger suffix>.<step>.<started|complete|failed>") we time.
_CONNECT_START, _CONNECT_END, _TLS_START, _TLS_END = range(4)
_TRACE_EVENTS: dict[str, int] = {
    "connection.connect_tcp.started": _CONNECT_START,
    "connection.connect_tcp.complete": _CONNECT_END,
    "connection.start_tls.started": _TLS_START,
    "connection.start_tls.complete": _TLS_END,
}

Trace = Callable[[str, Mapping[str, Any]], Awaitable[None]]


@dataclass(slots=True)
class Exchange:
    """One request through the sidecar, as the observer sees it."""

    start: float
    method: str
    path: str  # never the query string
    route: str = "-"
    upstream: str = "-"  # host:port
    status: int = 0
    kind: str | None = None  # error kind, or None when the upstream's answer was relayed
    detail: str = ""
    reason: str | None = None  # a denial's named reason (EgressError.reason), when it has one
    would_deny: str | None = None  # report mode: the host rule that would have refused it
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: bytes | None = None
    reused: bool | None = None  # None: unknown (no connection was reached)
    response_started: bool = False
    sent: float = 0.0  # request handed to the pool (the last attempt's, with retries)
    headers: float = 0.0  # upstream response head received
    first_event: float = 0.0  # first connection trace event after `sent`
    connect_start: float = 0.0
    connect_end: float = 0.0
    tls_start: float = 0.0
    tls_end: float = 0.0
    connects: int = 0  # TCP connections opened for this exchange (retries can open several)
    end: float = 0.0
    intercepted: bool = False  # decrypted inside a CONNECT tunnel (sidecar/intercept/terminate.py)

    def mark_sent(self) -> None:
        """Call right before handing the request to the transport (each attempt)."""
        self.sent = _now()
        # A retry starts its timings afresh; `connects` keeps counting across attempts.
        self.first_event = self.connect_start = self.connect_end = self.tls_start = self.tls_end = 0.0

    async def trace(self, name: str, info: Mapping[str, Any]) -> None:
        """httpx `trace` extension callback (async: httpcore awaits it on the async path)."""
        now = _now()
        if not self.first_event:
            self.first_event = now
        event = _TRACE_EVENTS.get(name)
        if event is None:
            return
        if event == _CONNECT_START:
            self.connect_start = now
        elif event == _CONNECT_END:
            self.connect_end = now
            self.connects += 1
        elif event == _TLS_START:
            self.tls_start = now
        else:
            self.tls_end = now


@dataclass(slots=True)
class TunnelRecord:
    """One tunnel as the observer sees it (perf_counter marks; 0.0: not reached)."""

    start: float
    host: str  # canonical: lower-case, no brackets, no trailing dot
    port: int
    source: str = "connect"  # or "transparent"
    address: str | None = None  # the checked address the upstream connection went to
    sni: str | None = None
    connect_start: float = 0.0
    connect_end: float = 0.0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    outcome: str = ""  # how it ended: closed, client_closed, upstream_closed, client_reset, upstream_reset,
    #                    idle_timeout, drained, intercepted, client_timeout, bad_hello, or a REFUSALS reason
    detail: str = ""
    end: float = 0.0
    would_deny: str | None = None  # report mode: the host rule that would have refused it

    @property
    def upstream(self) -> str:
        return f"{self.host}:{self.port}"
