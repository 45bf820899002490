"""The egress inventory: every destination the sidecar saw, kept in memory, served as admin /destinations.

A destination is (host:port, how it was reached): a route's name, the forward-proxy form, or
a tunnel (CONNECT). Each keeps its requests, methods, status classes, denials and would-denies
(report mode) with their reasons, body bytes each way, and first and last seen. It is what a
team looks at before turning `policy.default: deny` on, and what `egress-sidecar
suggest-policy` turns into an allow-list.

Bounded by `inventory.max_entries`: the least recently seen destination goes first and
`evicted` counts how many went. Recording is a few dict and int operations on the event-loop
thread, no lock, no clock read (the exchange's own end mark is the time): ~1 µs per request
(bench/inventory_cost.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.exchange import Exchange

# Methods counted by name; any other token counts as OTHER, so a client cannot grow the dicts.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_DENIALS = frozenset({"denied_host", "denied_ip", "denied_port"})

FORWARD = "-"  # the route of a forward-proxy request (Exchange.route)
TUNNEL = None  # the "route" of a tunnel in an entry's key

Key = tuple[str, str | None]  # (host:port, route name | "-" forward proxy | None tunnel)


class Entry:
    """One destination's counts; plain slots updated in place on the hot path."""

    __slots__ = ("bytes_received", "bytes_sent", "denied", "first", "last", "methods", "requests", "status",
                 "would_deny")

    def __init__(self, now: float) -> None:
        self.requests = 0
        self.methods: dict[str, int] = {}
        self.status = [0] * 10  # by status // 100; 0: no status (the app left first)
        self.denied: dict[str, int] = {}  # reason -> count
        self.would_deny: dict[str, int] = {}  # reason -> count (report mode)
        self.bytes_sent = 0  # request bodies, app -> upstream
        self.bytes_received = 0  # response bodies, upstream -> app
        self.first = now  # perf_counter marks; shown as wall-clock time
        self.last = now


class Inventory:
    """Destinations by key, least recently seen first (an OrderedDict moved to the end per request)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.evicted = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    def resize(self, max_entries: int) -> None:
        """A new bound (config reload); evicts the least recently seen past it at once."""
        self.max_entries = max_entries
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evicted += 1

    def _entry(self, key: Key, now: float) -> Entry:
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = Entry(now)
            if len(entries) > self.max_entries:
                self._evict()
        else:
            entries.move_to_end(key)
        return entry

    def record(self, ex: Exchange) -> None:
        """Count one finished request (the observer calls this once per request)."""
        upstream = ex.upstream
        if upstream == "-":
            return  # refused before a destination was known (bad request, no route)
        # A CONNECT refused before its 200 comes as an exchange: it counts against the tunnel's entry.
        entry = self._entry((upstream, ex.route if ex.method != "CONNECT" else TUNNEL), ex.end)
        entry.requests += 1
        method = ex.method if ex.method in _METHODS else "OTHER"
        methods = entry.methods
        methods[method] = methods.get(method, 0) + 1
        entry.status[ex.status // 100 % 10] += 1
        entry.bytes_sent += ex.bytes_in
        entry.bytes_received += ex.bytes_out
        entry.last = ex.end
        if ex.would_deny is not None:
            counts = entry.would_deny
            counts[ex.would_deny] = counts.get(ex.would_deny, 0) + 1
        if ex.kind in _DENIALS:
            reason = ex.reason or ex.kind
            entry.denied[reason] = entry.denied.get(reason, 0) + 1

    def record_tunnel(
        self,
        upstream: str,
        *,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        denied: str | None = None,
        would_deny: str | None = None,
        status: int = 200,
        end: float | None = None,
    ) -> None:
        """Count one tunnel (CONNECT) to `upstream` (host:port), when it closes or is refused.

        `denied`/`would_deny`: the policy's reason when it refused the tunnel, or (report mode)
        would have; `status`: what the app was answered (200 when the tunnel opened).
        """
        now = time.perf_counter() if end is None else end
        entry = self._entry((upstream, TUNNEL), now)
        entry.requests += 1
        entry.methods["CONNECT"] = entry.methods.get("CONNECT", 0) + 1
        entry.status[status // 100 % 10] += 1
        entry.bytes_sent += bytes_sent
        entry.bytes_received += bytes_received
        entry.last = now
        if would_deny is not None:
            entry.would_deny[would_deny] = entry.would_deny.get(would_deny, 0) + 1
        if denied is not None:
            entry.denied[denied] = entry.denied.get(denied, 0) + 1

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> dict[str, Any]:
        """The inventory as plain data (the /destinations JSON), most recently seen first."""
        offset = time.time() - time.perf_counter()  # perf_counter marks -> wall clock
        destinations = []
        for (upstream, route), entry in reversed(self._entries.items()):
            host, _, port = upstream.rpartition(":")
            destinations.append({
                "host": host,
                "port": int(port) if port.isdigit() else 0,
                "via": "tunnel" if route is TUNNEL else "forward-proxy" if route == FORWARD else "route",
                "route": route if route not in (TUNNEL, FORWARD) else None,
                "requests": entry.requests,
                "methods": dict(sorted(entry.methods.items())),
                "status": {f"{index}xx" if index else "none": count
                           for index, count in enumerate(entry.status) if count},
                "denied": sum(entry.denied.values()),
                "denied_reasons": dict(sorted(entry.denied.items())),
                "would_deny": sum(entry.would_deny.values()),
                "would_deny_reasons": dict(sorted(entry.would_deny.items())),
                "bytes_sent": entry.bytes_sent,
                "bytes_received": entry.bytes_received,
                "first_seen": _iso(entry.first + offset),
                "last_seen": _iso(entry.last + offset),
            })
        return {"max_entries": self.max_entries, "entries": len(destinations), "evicted": self.evicted,
                "destinations": destinations}


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"
