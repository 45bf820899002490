"""Load shedding: cap requests in flight globally and per route; past a cap, 503 at once.

A request over the cap is refused before anything is sent upstream, with `overloaded` and a
Retry-After, rather than queued: queueing inside the sidecar would only hide the overload
from the app and hold its memory and sockets (Envoy's `max_requests` circuit breaker does the
same). A request counts from admission until its response has been relayed in full.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.errors import EgressError


class Gate:
    """An in-flight counter with a cap; a route's gate also holds the global one."""

    __slots__ = ("in_flight", "limit", "name", "parent")

    def __init__(self, name: str, limit: int | None, parent: Gate | None = None) -> None:
        self.name = name
        self.limit = limit
        self.in_flight = 0
        self.parent = parent

    def enter(self) -> Gate:
        """Count one request in, or raise EgressError("overloaded") when this gate or its parent is full."""
        parent = self.parent
        if parent is not None and parent.limit is not None and parent.in_flight >= parent.limit:
            raise EgressError("overloaded", f"{parent.in_flight} requests in flight (limits.max_in_flight)")
        if self.limit is not None and self.in_flight >= self.limit:
            raise EgressError("overloaded", f"{self.in_flight} requests in flight on route {self.name}",
                              subject=f"route {self.name}" if parent is not None else None)
        self.in_flight += 1
        if parent is not None:
            parent.in_flight += 1
        return self

    def leave(self) -> None:
        self.in_flight -= 1
        if self.parent is not None:
            self.parent.in_flight -= 1


class Shedding:
    """The global gate and one gate per route, built once at start."""

    def __init__(
        self, global_limit: int | None, routes: Iterable[tuple[str, int | None]], previous: Shedding | None = None
    ) -> None:
        # After a reload the gates carry on (their limits updated): requests in flight under the
        # old config still count against the caps the new one sets.
        self.all: Gate = previous.all if previous is not None else Gate("*", global_limit)
        self.all.limit = global_limit
        self._routes: dict[str, Gate] = {}
        for name, limit in routes:
            gate = previous._routes.get(name) if previous is not None else None
            if gate is None:
                gate = Gate(name, limit, self.all)
            gate.limit = limit
            self._routes[name] = gate

    def gate(self, route: str | None) -> Gate:
        """The gate a request on `route` (None: forward-proxy form) passes through."""
        if route is None:
            return self.all
        return self._routes[route]

    def in_flight(self) -> dict[str, int]:
        """route -> requests in flight now (and "*" for all), for a gauge if the metrics want one."""
        return {"*": self.all.in_flight, **{name: gate.in_flight for name, gate in self._routes.items()}}
