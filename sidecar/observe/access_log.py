"""One structured log line per request (structlog; JSON lines, console rendering on a TTY).

A relayed answer logs event `access` at info; an error the sidecar produced (including a
denial, or a failure after the head went out) logs event `egress_error` at warning with the
same fields plus `detail`, so one request is always one line. `log.access: false` drops the
`access` lines only: every error still gets its line. In report mode a request the host rules
would refuse logs `"decision": "would_deny"` and its `reason` (always, access lines on or off).

Durations are milliseconds: `duration_ms` from the request's arrival to the last byte sent
to the app; `headers_ms`, `pool_wait_ms`, `connect_ms`, `tls_ms` measured as the metrics of
the same name (see metrics.py); null when the step did not happen (a reused connection has
no connect or TLS time). `path` never carries the query string; header values never appear.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.structs

from sidecar.observe import log as log_module

if TYPE_CHECKING:
    from sidecar.exchange import Exchange, TunnelRecord


def _ms(start: float, end: float) -> float | None:
    return round((end - start) * 1000.0, 3) if start and end else None


def access_fields(ex: Exchange) -> dict[str, Any]:
    """The access-log fields of one exchange (pure; the renderer adds `time` and `level`)."""
    request_id = ex.request_id
    fields: dict[str, Any] = {
        "request_id": request_id.decode("latin-1") if request_id is not None else None,
        "route": ex.route,
        "upstream": ex.upstream,
        "method": ex.method,
        "path": ex.path,
        "status": ex.status,
        "kind": ex.kind,
        "duration_ms": _ms(ex.start, ex.end),
        "headers_ms": _ms(ex.sent, ex.headers),
        "pool_wait_ms": _ms(ex.sent, ex.first_event),
        "connect_ms": _ms(ex.connect_start, ex.connect_end),
        "tls_ms": _ms(ex.tls_start, ex.tls_end),
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "reused": ex.reused,
    }
    if ex.intercepted:
        fields["intercepted"] = True
    return fields


# Tunnel outcomes logged at warning, with their reason: refusals after the 200 and failures.
_TUNNEL_WARNINGS = frozenset({"sni_mismatch", "no_sni", "not_tls", "bad_hello", "client_timeout", "upstream_reset",
                              "intercept_error"})


def tunnel_fields(record: TunnelRecord) -> dict[str, Any]:
    """The `tunnel` line's fields: the access line's keys where they mean the same (route,
    upstream, method, path = the CONNECT target, status, duration_ms, connect_ms, bytes_in =
    client to upstream, bytes_out = upstream to client), then the tunnel's own."""
    return {
        "route": "-",
        "upstream": record.upstream,
        "method": "CONNECT" if record.source == "connect" else record.source,
        "path": record.upstream,
        "status": 200,
        "duration_ms": _ms(record.start, record.end),
        "connect_ms": _ms(record.connect_start, record.connect_end),
        "bytes_in": record.bytes_up,
        "bytes_out": record.bytes_down,
        "address": record.address,
        "sni": record.sni,
        "outcome": record.outcome,
    }


class _AccessLine(msgspec.Struct, gc=False):
    """The `access` line as structlog renders it (access_fields, then event, level, time), in
    that key order; msgspec encodes it in one call, with no dict and no processor chain."""

    request_id: str | None
    route: str
    upstream: str
    method: str
    path: str
    status: int
    kind: str | None
    duration_ms: float | None
    headers_ms: float | None
    pool_wait_ms: float | None
    connect_ms: float | None
    tls_ms: float | None
    bytes_in: int
    bytes_out: int
    reused: bool | None
    event: str
    level: str
    time: str


# The line of a request decrypted inside a tunnel: `intercepted: true` after `reused`, where
# access_fields puts it (only such lines carry the key).
_InterceptedAccessLine = msgspec.defstruct(
    "_InterceptedAccessLine",
    [(f.name, f.type) for f in msgspec.structs.fields(_AccessLine) if f.name not in ("event", "level", "time")]
    + [("intercepted", bool), ("event", str), ("level", str), ("time", str)],
    gc=False,
)


_encode = msgspec.json.Encoder().encode


def render_access_line(ex: Exchange, time: str) -> bytes:
    """The JSON `access` line of `ex`, newline included (what structlog's JSON set-up writes)."""
    request_id = ex.request_id
    if ex.intercepted:
        return _encode(_InterceptedAccessLine(
            request_id.decode("latin-1") if request_id is not None else None, ex.route, ex.upstream, ex.method,
            ex.path, ex.status, ex.kind, _ms(ex.start, ex.end), _ms(ex.sent, ex.headers),
            _ms(ex.sent, ex.first_event), _ms(ex.connect_start, ex.connect_end), _ms(ex.tls_start, ex.tls_end),
            ex.bytes_in, ex.bytes_out, ex.reused, True, "access", "info", time,
        )) + b"\n"
    return _encode(_AccessLine(
        request_id.decode("latin-1") if request_id is not None else None, ex.route, ex.upstream, ex.method,
        ex.path, ex.status, ex.kind, _ms(ex.start, ex.end), _ms(ex.sent, ex.headers), _ms(ex.sent, ex.first_event),
        _ms(ex.connect_start, ex.connect_end), _ms(ex.tls_start, ex.tls_end), ex.bytes_in, ex.bytes_out,
        ex.reused, "access", "info", time,
    )) + b"\n"


class AccessLog:
    """Writes the per-request line; the logger is looked up once, here, not per request.

    An `access` line in JSON (the sidecar's format whenever stdout is not a terminal) skips
    structlog: rendered by `render_access_line` straight into the log output, ~1.5 us instead
    of ~6 (bench/micro/observe_cost.py). Errors, and console output, go through structlog.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        # bind(): the concrete logger of the configuration in force (built after log.configure),
        # not the lazy proxy, which costs ~0.6 us more per call.
        self.log = log_module.get("egress.access").bind()
        self.sink = log_module.json_sink(logging.INFO)

    def tunnel(self, record: TunnelRecord) -> None:
        """One line per tunnel (structlog: a tunnel is long-lived, the line is not hot)."""
        fields = tunnel_fields(record)
        if record.outcome in _TUNNEL_WARNINGS:
            if record.would_deny is not None:
                fields["decision"] = "would_deny"
            self.log.warning("tunnel", reason=record.outcome, detail=record.detail, **fields)
        elif record.would_deny is not None:  # report mode: always logged, like a would-deny request
            self.log.info("tunnel", decision="would_deny", reason=record.would_deny, **fields)
        elif self.enabled:
            self.log.info("tunnel", **fields)

    def emit(self, ex: Exchange) -> None:
        if ex.kind is None:
            if ex.would_deny is not None:
                # Report mode: always logged (even with log.access off), it is what the mode is for.
                self.log.info("access", decision="would_deny", reason=ex.would_deny, **access_fields(ex))
            elif self.enabled:
                sink = self.sink
                if sink is not None:
                    sink.output.write_bytes(render_access_line(ex, sink.timestamp.now()))
                else:
                    self.log.info("access", **access_fields(ex))
            return
        fields = access_fields(ex)
        if ex.would_deny is not None:
            fields["decision"], fields["reason"] = "would_deny", ex.would_deny
        elif ex.reason is not None:
            fields["reason"] = ex.reason
        self.log.warning("egress_error", detail=ex.detail, **fields)
