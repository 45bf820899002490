"""What the forward path reports about each exchange, and who listens.

The forward path fills one `Exchange` per request and hands it to the `Observer` at the end.
The observer turns it into metrics and the access log; the hot path knows neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sidecar import log as log_module


@dataclass(slots=True)
class Exchange:
    """One request through the sidecar, as the observer sees it."""

    start: float
    method: str
    path: str
    route: str = "-"
    upstream: str = "-"
    status: int = 0
    kind: str | None = None  # error kind, or None when the upstream's answer was relayed
    detail: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    request_id: bytes | None = None
    reused: bool | None = None
    response_started: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    end: float = 0.0


class Observer:
    """Default observer: one log line for each error the sidecar produces."""

    def __init__(self) -> None:
        self.log = log_module.get("egress.access")

    def trace_for(self, exchange: Exchange) -> Any:
        """An httpx `trace` extension callback for this exchange, or None."""
        return None

    def started(self, exchange: Exchange) -> None:
        return None

    def finished(self, exchange: Exchange) -> None:
        if exchange.kind is not None:
            self.log.warning(
                "egress_error",
                kind=exchange.kind,
                status=exchange.status,
                method=exchange.method,
                route=exchange.route,
                upstream=exchange.upstream,
                path=exchange.path,
                detail=exchange.detail,
            )
