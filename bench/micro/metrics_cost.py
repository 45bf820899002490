"""CPU cost of the per-request metrics update, `Metrics.record`, alone: `python -m bench.micro.metrics_cost`.

    .venv/bin/python -m bench.micro.metrics_cost [--count 50000]

Times (process CPU time, best of 5 rounds, the cost of an empty call taken off) two shapes of
finished exchange, made up front so only `record` is timed:

- reused: a request on a pooled connection (requests_total, duration / response headers /
  pool wait observed, reused and response bytes counted): most requests under load;
- new connection: the same plus TCP connect and TLS handshake observed and an open counted.

Durations cycle over the histogram's range so every bucket is hit. `bench.micro.observe_cost` times
the whole `Observer.finished` (metrics and the access line); this isolates the metrics part.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bench.micro.observe_cost import per_call_us
from sidecar.config import Config
from sidecar.observe.metrics import BUCKETS, Metrics
from sidecar.observe.observer import Exchange

SHAPES = 64  # distinct exchanges per shape, cycled


def _exchange(index: int, new_connection: bool) -> Exchange:
    # Spread the durations over the buckets (from 0.5 ms up to past the last bound).
    duration = BUCKETS[index % len(BUCKETS)] * (0.5 + (index % 3) / 2)
    start = 1000.0
    sent = start + 1e-5
    ex = Exchange(start=start, method="GET", path="/repos/x/y", route="github", upstream="api.github.com:443",
                  status=200, bytes_out=1234, sent=sent, first_event=sent + 2e-5,
                  headers=start + duration * 0.9, end=start + duration, reused=not new_connection)
    if new_connection:
        ex.connect_start, ex.connect_end = sent + 2e-5, sent + 3e-4
        ex.tls_start, ex.tls_end = sent + 3e-4, sent + 2e-3
        ex.connects = 1
    return ex


def time_record(new_connection: bool, count: int) -> float:
    """µs of CPU per `Metrics.record` call for one shape of exchange."""
    metrics = Metrics(Config(), lambda: 0.0)
    exchanges = [_exchange(index, new_connection) for index in range(SHAPES)]
    record = metrics.record
    mask = SHAPES - 1

    def call(index: int) -> None:
        record(exchanges[index & mask])

    def empty(index: int) -> None:
        exchanges[index & mask]

    return per_call_us(call, count, rounds=5) - per_call_us(empty, count, rounds=5)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=50_000)
    args = parser.parse_args(argv)
    shapes: dict[str, Callable[[], float]] = {
        "reused connection": lambda: time_record(False, args.count),
        "new connection (connect + TLS)": lambda: time_record(True, args.count),
    }
    results = {name: run() for name, run in shapes.items()}
    for name, us in results.items():
        print(f"Metrics.record, {name:32s} {us:6.2f} us", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
