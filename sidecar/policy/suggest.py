"""`egress-sidecar suggest-policy`: turn what sidecars saw into a reviewed allow-list.

Sources, merged: admin URLs of running sidecars (their `/destinations`), saved
`/destinations` JSON files, and `--prometheus URL` (the fleet: every sidecar Prometheus
scraped, over `--window`). The output is a commented YAML `policy:` block that
`egress-sidecar check-config` accepts: `mode: enforce`, `default: deny`, the hosts that were
reached through the forward proxy or a tunnel (a route's upstream is allowed by being
configured), and `connect_ports` for the ports tunnels used. Each host's comment says how
often, how, first/last seen where known, and whether it was a would-deny (report mode).

Only what went through is suggested: a destination every request to which was refused (an
address rule: private, metadata, the sidecar itself) is listed in a comment, never allowed.
`--collapse N` replaces N or more names under one parent domain by `*.parent`, deepest
parent first, and never a public suffix (`*.com`, `*.co.uk`, `*.github.io`,
`*.s3.amazonaws.com`): the Public Suffix List decides, through the `publicsuffixlist`
package (its bundled copy of the list, no network).

Pure parts (`merge`, `collapse`, `render`) are plain functions over plain data; the I/O is
`read_source` and `read_prometheus`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.errors import TUNNEL_REFUSALS
from sidecar.policy.hostnames import canonical_host


@dataclass
class Seen:
    """One host, merged over every source and port."""

    host: str
    requests: int = 0  # requests and tunnels that went through (denied ones not counted)
    denied: int = 0
    ports: set[int] = field(default_factory=set)
    tunnel_ports: set[int] = field(default_factory=set)
    via: set[str] = field(default_factory=set)
    would_deny: dict[str, int] = field(default_factory=dict)
    first_seen: str | None = None
    last_seen: str | None = None
    sources: set[str] = field(default_factory=set)


def merge(inventories: Iterable[tuple[str, Mapping[str, Any]]]) -> tuple[dict[str, Seen], list[str]]:
    """(source name, /destinations JSON) pairs -> hosts seen through the proxy or a tunnel, and
    notes on what was left out (route upstreams, unparseable names)."""
    seen: dict[str, Seen] = {}
    notes: list[str] = []
    for source, inventory in inventories:
        for entry in inventory.get("destinations", []):
            if entry.get("via") == "route":
                continue  # allowed by being configured
            try:
                host = canonical_host(str(entry["host"]))
            except ValueError:
                notes.append(f"{entry['host']!r} ({source}) is not a valid host name: left out")
                continue
            item = seen.setdefault(host, Seen(host))
            denied = int(entry.get("denied", 0))
            item.requests += max(0, int(entry.get("requests", 0)) - denied)
            item.denied += denied
            port = int(entry.get("port", 0))
            if entry.get("requests", 0) > denied:
                item.ports.add(port)
                if entry.get("via") == "tunnel":
                    item.tunnel_ports.add(port)
            item.via.add(str(entry.get("via", "forward-proxy")))
            for reason, count in (entry.get("would_deny_reasons") or {}).items():
                item.would_deny[reason] = item.would_deny.get(reason, 0) + int(count)
            first, last = entry.get("first_seen"), entry.get("last_seen")
            if first and (item.first_seen is None or first < item.first_seen):
                item.first_seen = first
            if last and (item.last_seen is None or last > item.last_seen):
                item.last_seen = last
            item.sources.add(source)
    return seen, notes


def collapse(names: Iterable[str], at_least: int, registrable: Callable[[str], str | None]) -> dict[str, list[str]]:
    """Pattern -> the names it stands for: `*.parent` where `at_least` names share `parent`
    (deepest parent first), else the name itself. 0 or 1: no collapsing.

    A parent qualifies for a name only at or below the name's registrable domain (one label
    under its public suffix): `*.example.com` may cover `a.example.com`, but neither `*.com`
    nor `*.amazonaws.com` may cover `b1.s3.amazonaws.com` (each bucket its own owner).
    """
    remaining = sorted(set(names))
    patterns: dict[str, list[str]] = {}
    if at_least >= 2:
        owner = {name: registrable(name) for name in remaining if not _is_ip(name)}
        parents: set[str] = set()
        for name, domain in owner.items():
            labels = name.split(".")
            if domain is not None:
                parents.update(p for p in (".".join(labels[i:]) for i in range(1, len(labels)))
                               if p == domain or p.endswith("." + domain))
        for parent in sorted(parents, key=lambda p: (-p.count("."), p)):
            under = [name for name in remaining if name.endswith("." + parent) and owner.get(name) is not None
                     and (parent == owner[name] or parent.endswith("." + str(owner[name])))]
            if len(under) >= at_least:
                patterns["*." + parent] = under
                remaining = [name for name in remaining if name not in under]
    for name in remaining:
        patterns[name] = [name]
    return dict(sorted(patterns.items(), key=lambda item: item[0].lstrip("*.")))


def _is_ip(name: str) -> bool:
    return ":" in name or name.replace(".", "").isdigit()


def registrable_domain() -> Callable[[str], str | None]:
    """`registrable(name)`: the name's domain one label under its public suffix (Public Suffix
    List, ICANN and private sections), or None when the name is itself a public suffix."""
    from publicsuffixlist import PublicSuffixList  # only suggest-policy needs it

    psl = PublicSuffixList()

    def registrable(name: str) -> str | None:
        found = psl.privatesuffix(name)
        return str(found) if found else None

    return registrable


def _count(number: int, what: str) -> str:
    return f"{number} {what}{'' if number == 1 else 's'}"


def render(seen: Mapping[str, Seen], at_least: int, registrable: Callable[[str], str | None], sources: Sequence[str],
           notes: Sequence[str] = (), window: str | None = None) -> str:
    """The commented YAML `policy:` block."""
    allowed = {host: item for host, item in seen.items() if item.requests > 0}
    refused = sorted(host for host, item in seen.items() if item.requests == 0)
    patterns = collapse(allowed, at_least, registrable)
    lines = [
        "# Suggested by egress-sidecar suggest-policy on " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "# from: " + ", ".join(sources) + (f" (Prometheus window {window})" if window else ""),
        "# Review it: every host below was reached through this proxy (forward proxy or CONNECT);",
        "# routes' upstreams are allowed by being configured and are not listed. WOULD-DENY: the",
        "# policy in force when it was seen (report mode) would have refused it.",
    ]
    lines += [f"# note: {note}" for note in notes]
    lines += ["policy:", "  mode: enforce", "  default: deny", "  allow_hosts:"]
    if not patterns:
        lines[-1] = "  allow_hosts: []"
    tunnel_ports: set[int] = set()
    for pattern, names in patterns.items():
        items = [allowed[name] for name in names]
        tunnel_ports.update(port for item in items for port in item.tunnel_ports)
        requests = sum(item.requests for item in items)
        about = [_count(requests, "request"), "via " + "+".join(sorted({v for i in items for v in i.via}))]
        ports = sorted({port for item in items for port in item.ports})
        about.append("port" + ("s " if len(ports) > 1 else " ") + ",".join(map(str, ports)))
        firsts = [item.first_seen for item in items if item.first_seen]
        lasts = [item.last_seen for item in items if item.last_seen]
        if firsts and lasts:
            about.append(f"seen {min(firsts)} .. {max(lasts)}")
        would: dict[str, int] = {}
        for item in items:
            for reason, count in item.would_deny.items():
                would[reason] = would.get(reason, 0) + count
        if would:
            about.append("WOULD-DENY " + ", ".join(f"{reason} x{count}" for reason, count in sorted(would.items())))
        if len(names) > 1:
            about.append("collapsed: " + ", ".join(names))
        lines.append(f"    - {json.dumps(pattern)}  # " + "; ".join(about))
    lines.append("  connect_ports: " + json.dumps(sorted(tunnel_ports or {443})))
    for host in refused:
        lines.append(f"# not allowed: {host} - every request to it was refused ({_count(seen[host].denied, 'time')})")
    return "\n".join(lines) + "\n"


# --- sources ------------------------------------------------------------------------------


def read_source(source: str) -> Mapping[str, Any]:
    """A /destinations JSON from an admin URL (`http://host:15090` or its `/destinations`) or a file."""
    if source.startswith(("http://", "https://")):
        import httpx

        url = source if source.rstrip("/").endswith("/destinations") else source.rstrip("/") + "/destinations"
        response = httpx.get(url, timeout=10, trust_env=False)
        response.raise_for_status()
        data: Mapping[str, Any] = response.json()
        return data
    loaded: Mapping[str, Any] = json.loads(Path(source).read_text())
    return loaded


def _split_upstream(upstream: str) -> tuple[str, int] | None:
    host, _, port = upstream.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def read_prometheus(url: str, window: str) -> tuple[Mapping[str, Any], list[str]]:
    """The fleet's destinations from Prometheus' HTTP API, shaped like /destinations.

    Counts are each counter's largest value in the window, summed over the sidecars (a series
    exists once its first request was counted: that it exists at all is what matters here);
    first/last seen are not kept by the metrics and stay empty. Destinations past
    `metrics.max_upstreams` are labelled `other` and cannot be named: they are reported in a note.
    """
    import httpx

    def query(expr: str) -> list[dict[str, Any]]:
        response = httpx.get(url.rstrip("/") + "/api/v1/query", params={"query": expr}, timeout=30, trust_env=False)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {expr!r}: {body.get('error', response.text[:200])}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def by(expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in query(expr)}

    forward = '{route="-"}'
    requests = by(f"sum by (upstream) (max_over_time(egress_requests_total{forward}[{window}]))", "upstream")
    denied = by(f'sum by (upstream) (max_over_time(egress_errors_total{{route="-",kind=~"denied_.*"}}[{window}]))',
                "upstream")
    would = by(f"sum by (upstream, reason) (max_over_time(egress_would_deny_total[{window}]))", "upstream", "reason")
    tunnels = by(f"sum by (upstream, outcome) (max_over_time(egress_tunnels_total[{window}]))", "upstream", "outcome")
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    notes: list[str] = []

    def entry(upstream: str, via: str) -> dict[str, Any] | None:
        if upstream == "other":
            return None
        split = _split_upstream(upstream)
        if split is None:
            return None
        return entries.setdefault((upstream, via), {"host": split[0], "port": split[1], "via": via, "requests": 0,
                                                    "denied": 0, "would_deny_reasons": {}})

    for (upstream,), count in requests.items():
        found = entry(upstream, "forward-proxy")
        if found is not None:
            found["requests"] += int(count)
            found["denied"] += int(denied.get((upstream,), 0))
    for (upstream, outcome), count in tunnels.items():
        found = entry(upstream, "tunnel")
        if found is not None:
            found["requests"] += int(count)
            if outcome in TUNNEL_REFUSALS:
                found["denied"] += int(count)
    for (upstream, reason), count in would.items():
        found = entries.get((upstream, "forward-proxy")) or entries.get((upstream, "tunnel"))
        if found is not None:
            found["would_deny_reasons"][reason] = found["would_deny_reasons"].get(reason, 0) + int(count)
    other = requests.get(("other",), 0) + sum(c for (u, _o), c in tunnels.items() if u == "other")
    if other:
        notes.append(f"{int(other)} requests/tunnels went to destinations past metrics.max_upstreams "
                     "(label `other`): read those sidecars' /destinations to name them")
    return {"destinations": list(entries.values())}, notes


def suggest(sources: Sequence[str], prometheus: str | None, window: str, at_least: int) -> str:
    """Read every source, merge, render (the CLI's whole job)."""
    inventories: list[tuple[str, Mapping[str, Any]]] = [(source, read_source(source)) for source in sources]
    notes: list[str] = []
    shown = list(sources)
    if prometheus is not None:
        fleet, prometheus_notes = read_prometheus(prometheus, window)
        inventories.append((prometheus, fleet))
        notes += prometheus_notes
        shown.append(f"prometheus {prometheus}")
    seen, merge_notes = merge(inventories)
    return render(seen, at_least, registrable_domain(), shown, notes + merge_notes,
                  window if prometheus is not None else None)
