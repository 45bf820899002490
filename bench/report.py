"""Turn the measured results into the Markdown tables and the JSON document.

Pure functions over plain dicts (the JSON shape), so a saved latest.json can be re-rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.candidates import OURS, PEERS

Result = Mapping[str, Any]
MIB = 1024 * 1024


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def _load(result: Result, level: int) -> Mapping[str, Any] | None:
    loads: Mapping[str, Any] = result.get("load") or {}
    return loads.get(str(level))


def _stat(result: Result, level: int, key: str) -> float | None:
    load = _load(result, level)
    return None if load is None else load.get(key)


def ratios(results: Sequence[Result], levels: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """Ours divided by each peer: req/s per level (higher is better for ours), CPU per request
    at each level (lower is better for ours), streaming MiB/s (higher is better)."""
    by_name = {result["name"]: result for result in results}
    ours = by_name.get(OURS)
    table: dict[str, dict[str, float | None]] = {}
    if ours is None:
        return table
    for peer_name in PEERS:
        peer = by_name.get(peer_name)
        if peer is None:
            continue
        row: dict[str, float | None] = {}
        for level in levels:
            for key, label in (("rps", "rps"), ("cpu_us_per_req", "cpu")):
                a, b = _stat(ours, level, key), _stat(peer, level, key)
                row[f"{label}_c{level}"] = a / b if a and b else None
        a, b = (ours.get("stream") or {}).get("mib_per_s"), (peer.get("stream") or {}).get("mib_per_s")
        row["stream_mib_s"] = a / b if a and b else None
        table[peer_name] = row
    return table


def goals(results: Sequence[Result], pool_size: int) -> list[tuple[str, bool | None, str]]:
    """Issue 3's goals for ours, each (goal, met?, the measured value); None when unmeasured."""
    by_name = {result["name"]: result for result in results}
    ours, aio, nginx = by_name.get(OURS), by_name.get("aiohttp"), by_name.get("nginx")
    if ours is None or not ours.get("ok"):
        return [("sidecar measured", False, (ours or {}).get("error") or "not run")]
    out: list[tuple[str, bool | None, str]] = []

    def check(goal: str, value: float | None, ok: bool | None, shown: str) -> None:
        out.append((goal, None if value is None else ok, shown if value is not None else "not measured"))

    for level in (32, 256):
        a, b = _stat(ours, level, "rps"), _stat(aio, level, "rps") if aio else None
        r = a / b if a and b else None
        check(f"req/s >= 1.0x aiohttp at c{level}", r, r is not None and r >= 1.0, f"{r:.2f}x" if r else "")
    p99 = _stat(ours, 256, "p99_ms")
    check("c256 p99 <= 100 ms", p99, p99 is not None and p99 <= 100, f"{_ms(p99)} ms")
    for level in (32, 256):
        cpu = _stat(ours, level, "cpu_us_per_req")
        check(f"CPU <= 150 µs/request at c{level}", cpu, cpu is not None and cpu <= 150, f"{_num(cpu)} µs")
    added = ours.get("added_p50_ms")
    check("c1 added p50 vs direct <= 0.3 ms", added, added is not None and added <= 0.3, f"{_ms(added)} ms")
    ours_stream, nginx_stream = ours.get("stream") or {}, (nginx or {}).get("stream") or {}
    a, b = ours_stream.get("mib_per_s"), nginx_stream.get("mib_per_s")
    r = a / b if a and b else None
    check("100 MiB stream >= 0.9x nginx MiB/s", r, r is not None and r >= 0.9, f"{r:.2f}x" if r else "")
    idle, peak = ours.get("idle_rss_bytes"), ours_stream.get("peak_rss_bytes")
    grow = (peak - idle) / MIB if peak and idle else None
    check("stream peak RSS <= idle + 16 MiB", grow, grow is not None and grow <= 16, f"+{_num(grow, 1)} MiB")
    idle_mib = idle / MIB if idle else None
    check("idle RSS <= 45 MiB", idle_mib, idle_mib is not None and idle_mib <= 45, f"{_num(idle_mib, 1)} MiB")
    ready = ours.get("readyz_ms") or ours.get("ready_ms")
    check("ready <= 0.5 s after start", ready, ready is not None and ready <= 500, f"{_num(ready)} ms")
    conns = (ours.get("upstream") or {}).get("connections")
    check(f"upstream TLS connections <= pool size ({pool_size})", conns,
          conns is not None and conns <= pool_size, f"{conns}")
    return out


H2 = "sidecar-h2"


def h2_goals(results: Sequence[Result]) -> list[tuple[str, bool | None, str]]:
    """Issue 18's goals: the HTTP/2 route against the HTTP/1.1 route measured in the same run."""
    by_name = {result["name"]: result for result in results}
    h1, h2 = by_name.get(OURS), by_name.get(H2)
    if h1 is None or h2 is None:
        return []
    out: list[tuple[str, bool | None, str]] = []
    for level in (32, 256):
        a, b = _stat(h2, level, "cpu_us_per_req"), _stat(h1, level, "cpu_us_per_req")
        r = a / b if a and b else None
        out.append((f"CPU per request <= 1.3x HTTP/1.1 at c{level}", None if r is None else r <= 1.3,
                    f"{r:.2f}x ({_num(a)} vs {_num(b)} µs)" if r else "not measured"))
    for level in (32, 256):
        a, b = _stat(h2, level, "rps"), _stat(h1, level, "rps")
        r = a / b if a and b else None
        out.append((f"req/s >= 0.8x HTTP/1.1 at c{level}", None if r is None else r >= 0.8,
                    f"{r:.2f}x ({_num(a)} vs {_num(b)})" if r else "not measured"))
    conns = (h2.get("upstream") or {}).get("connections")
    out.append(("upstream TLS connections <= 2 for the whole run", None if conns is None else conns <= 2,
                f"{conns}" if conns is not None else "not measured"))
    return out


def markdown(doc: Mapping[str, Any]) -> str:
    """The whole report: machine, settings, three tables and the goals."""
    results: Sequence[Result] = doc["candidates"]
    levels: Sequence[int] = doc["settings"]["levels"]
    machine = doc["machine"]
    settings = doc["settings"]
    lines = [
        f"# egress-sidecar benchmark ({doc['mode']}, {doc['finished_at']})",
        "",
        (f"Machine: {machine['cpu_model']}, {machine['cpus']} CPUs, {machine['mem_gib']:.1f} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, {machine['nginx']}, {machine['wrk']}; "
        f"load average at start {machine['loadavg_start']}, at end {machine.get('loadavg_end', '?')}."),
        (_pinning(settings) + f" wrk -t1, {settings['duration_s']} s per level after a "
        f"{settings['warmup_s']} s warm-up, 100 B body; stream: {settings['stream_bytes'] // MIB} MiB with curl."),
        "",
        "## Requests per second and latency (100 B responses; latency in ms)",
        "",
    ]
    head = ["candidate"]
    for level in levels:
        head += [f"c{level} req/s", f"c{level} p50", f"c{level} p99"]
    head.append("errors")
    lines += [_row(head), _row(["---"] * len(head))]
    for result in results:
        row = [result["name"]]
        for level in levels:
            row += [_num(_stat(result, level, "rps")), _ms(_stat(result, level, "p50_ms")),
                    _ms(_stat(result, level, "p99_ms"))]
        loads = (result.get("load") or {}).values()
        errors = sum(load.get("errors", 0) for load in loads)
        warm_errors = sum((load.get("warmup") or {}).get("errors", 0) for load in loads)
        shown = str(errors) + (f" (+{warm_errors} in warm-up)" if warm_errors else "")
        row.append(shown if result.get("ok") else "FAILED: " + " ".join(str(result.get("error", "")).split())[:120])
        lines.append(_row(row))
    lines += ["", "## Cost", "",
              ("CPU: utime+stime of the proxy's process tree over each wrk run ÷ requests completed. "
              "Added p50: p50 at c1 minus direct's p50 at c1. Idle RSS: right after ready. "
              "Ready: spawn → first proxied 100 B answer (ours: also /readyz). Upstream TLS conns: "
              "connections the upstream nginx accepted during the candidate's whole run (stub_status)."), ""]
    head = ["candidate"] + [f"CPU µs/req c{level}" for level in levels] + [
        "added p50 c1 (ms)", "stream MiB/s", "stream peak RSS MiB", "idle RSS MiB", "ready ms",
        "upstream TLS conns", "upstream reqs"]
    lines += [_row(head), _row(["---"] * len(head))]
    for result in results:
        stream = result.get("stream") or {}
        upstream = result.get("upstream") or {}
        ready = _num(result.get("ready_ms"))
        if result.get("readyz_ms") is not None:
            ready += f" (/readyz {_num(result['readyz_ms'])})"
        row = [result["name"]] + [_num(_stat(result, level, "cpu_us_per_req")) for level in levels] + [
            _ms(result.get("added_p50_ms")), _num(stream.get("mib_per_s")),
            _num(stream["peak_rss_bytes"] / MIB, 1) if stream.get("peak_rss_bytes") else "–",
            _num(result["idle_rss_bytes"] / MIB, 1) if result.get("idle_rss_bytes") else "–",
            ready, _num(upstream.get("connections")), _num(upstream.get("requests"))]
        lines.append(_row(row))
    table = doc.get("ratios") or {}
    if table:
        lines += ["", f"## Ours ({OURS}) ÷ peer", "",
                  "req/s and MiB/s: above 1 means ours is faster. CPU: below 1 means ours spends less.", ""]
        head = ["peer"] + [f"req/s c{level}" for level in levels] + [f"CPU c{level}" for level in levels] + ["MiB/s"]
        lines += [_row(head), _row(["---"] * len(head))]
        for peer, row_data in table.items():
            row = [peer] + [_fmt_ratio(row_data.get(f"rps_c{level}")) for level in levels] + [
                _fmt_ratio(row_data.get(f"cpu_c{level}")) for level in levels] + [
                _fmt_ratio(row_data.get("stream_mib_s"))]
            lines.append(_row(row))
    if doc.get("goals"):
        lines += ["", "## Performance goals (ours)", "", _row(["goal", "met", "measured"]), _row(["---"] * 3)]
        for goal, met, shown in doc["goals"]:
            lines.append(_row([goal, {True: "yes", False: "NO", None: "–"}[met], shown]))
    if doc.get("h2_goals"):
        lines += ["", "## HTTP/2 route goals (HTTP/2 route `sidecar-h2` vs HTTP/1.1 route `sidecar`, this run)", "",
                  _row(["goal", "met", "measured"]), _row(["---"] * 3)]
        for goal, met, shown in doc["h2_goals"]:
            lines.append(_row([goal, {True: "yes", False: "NO", None: "–"}[met], shown]))
    profiled = [(result["name"], level, data) for result in results
                for level, data in (result.get("profiles") or {}).items()]
    if profiled:
        lines += ["", "## Profiles (py-spy, an extra wrk run; % of busy samples)", ""]
        for name, level, data in profiled:
            lines += [(f"**{name} at c{level}** ({data['samples']:,} samples, "
                      f"{data['rps_while_sampled']:,.0f} req/s while sampled; stacks: `{data['raw']}`)"), "",
                      _row(["self %", "frame", "inclusive %", "frame"]), _row(["---"] * 4)]
            for own, incl in zip(data["self"], data["inclusive"], strict=False):
                lines.append(_row([f"{own[1]:.1f}", f"`{own[0]}`", f"{incl[1]:.1f}", f"`{incl[0]}`"]))
            lines.append("")
    lines += ["", "## Candidates", ""]
    for result in results:
        notes = []
        if "metrics" in result:
            metrics = result["metrics"]
            notes.append(f"/metrics answered {metrics.get('status')}"
                         + (" with egress_requests_total" if metrics.get("has_requests_total")
                            else " WITHOUT egress_requests_total"))
        served = sum(load.get("requests", 0) for load in (result.get("load") or {}).values())
        if "access_log_lines" in result:
            notes.append(f"{result['access_log_lines']:,} access-log lines for {served:,} measured requests")
        problems = (result.get("log") or {}).get("problems")
        if problems:
            notes.append("logged problems: " + ", ".join(f"{label} ×{count}" for label, count in problems.items()))
        extra = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"- **{result['name']}**: {result['description']}{extra}")
    return "\n".join(lines) + "\n"


def _pinning(settings: Mapping[str, Any]) -> str:
    if settings["proxy_cpu"] is None:
        return "One CPU: nothing pinned, the load and the proxy share it."
    return (f"Proxy under test pinned to CPU {settings['proxy_cpu']}; wrk, curl, the harness and the upstream "
            f"nginx share CPU {settings['load_cpu']}.")


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
