"""CPU cost of observing one request: the trace callback, the metrics update, the access line.

    .venv/bin/python -m bench.micro.observe_cost [--lines 10000] [--out FILE]

Runs in one process with no sockets: it times (CPU time, best of 3) `Observer.finished` (metrics + access log) on
realistic exchanges and structlog's stock set-up against ours for 10,000 lines. The log
lines go to FILE (default /dev/null; pass a pipe or a file to include the write cost).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

import structlog

from sidecar.config import Config, Log
from sidecar.observe import log as log_module
from sidecar.observe.observer import Exchange, Observer

EVENTS = (
    "connection.connect_tcp.started", "connection.connect_tcp.complete",
    "connection.start_tls.started", "connection.start_tls.complete",
    "http11.send_request_headers.started", "http11.send_request_headers.complete",
    "http11.receive_response_headers.started", "http11.receive_response_headers.complete",
)


def exchange(index: int) -> Exchange:
    now = time.perf_counter()
    return Exchange(start=now, method="GET", path="/repos/x/y", route="github", upstream="api.github.com:443",
                    status=200, request_id=b"0123456789abcdef0123456789abcdef", bytes_out=1234,
                    sent=now + 1e-5, first_event=now + 2e-5, headers=now + 0.01, end=now + 0.011,
                    reused=index % 10 != 0)


def per_call_us(fn: object, count: int, rounds: int = 3) -> float:
    """CPU time per call (process time, best of `rounds`): steadier than wall time on a shared box."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for index in range(count):
            fn(index)  # type: ignore[operator]
        best = min(best, (time.process_time() - start) / count * 1e6)
    return best


def stock_structlog(stream: object) -> object:
    """structlog as configured before: ISO TimeStamper, json.dumps, write + flush per line."""
    structlog.reset_defaults()
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger("bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--out", default="/dev/null")
    args = parser.parse_args()
    count = args.lines

    text_out = open(args.out, "w")  # noqa: SIM115 - kept open for the run
    fields = {"request_id": "0123456789abcdef0123456789abcdef", "route": "github", "upstream": "api.github.com:443",
              "method": "GET", "path": "/repos/x/y", "status": 200, "kind": None, "duration_ms": 11.0,
              "headers_ms": 10.0, "pool_wait_ms": 0.01, "connect_ms": None, "tls_ms": None, "bytes_in": 0,
              "bytes_out": 1234, "reused": True}
    stock = stock_structlog(text_out)
    stock_us = per_call_us(lambda i: stock.info("access", **fields), count)  # type: ignore[attr-defined]

    binary_out = open(args.out, "wb")  # noqa: SIM115
    log_module.configure(Log(format="json"), stream=binary_out)
    ours = log_module.get("bench")

    async def in_loop() -> tuple[float, float, float, float]:
        # Inside a running loop, as in the server: lines are batched by the flush timer.
        ours_us = per_call_us(lambda i: ours.info("access", **fields), count)
        observer = Observer(Config())
        finished_us = per_call_us(lambda i: observer.finished(exchange(i)), count)
        quiet = Observer(Config(log=Log(access=False)))
        metrics_us = per_call_us(lambda i: quiet.finished(exchange(i)), count)
        baseline_us = per_call_us(exchange, count)

        async def traced(i: int) -> None:
            ex = exchange(i)
            for name in EVENTS:
                await ex.trace(name, {})

        trace_us = float("inf")
        for _ in range(3):
            start = time.process_time()
            for index in range(count):
                await traced(index)
            trace_us = min(trace_us, (time.process_time() - start) / count * 1e6 - baseline_us)
        log_module.flush()
        return ours_us, finished_us - baseline_us, metrics_us - baseline_us, trace_us

    ours_us, finished_us, metrics_us, trace_us = asyncio.run(in_loop())
    print(f"{count} lines to {args.out}", file=sys.stderr)
    print(f"access line, structlog stock set-up (json.dumps, flush per line): {stock_us:6.1f} us", file=sys.stderr)
    print(f"a line through structlog, ours (errors, console; msgspec):       {ours_us:6.1f} us", file=sys.stderr)
    print(f"Observer.finished, metrics + access line:                         {finished_us:6.1f} us", file=sys.stderr)
    print(f"Observer.finished, metrics only (log.access: false):              {metrics_us:6.1f} us", file=sys.stderr)
    print(f"trace callback, 8 events:                                         {trace_us:6.1f} us", file=sys.stderr)


if __name__ == "__main__":
    main()
