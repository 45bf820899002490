"""CPU cost of recording one request in the egress inventory (sidecar/observe/inventory.py).

    .venv/bin/python -m bench.inventory_cost [--count 200000] [--destinations 50]

No sockets: times (CPU time, best of 3) `Inventory.record` on realistic exchanges spread over
`--destinations` destinations (the common case: a known entry, moved to the end), then over
more destinations than the bound (every record evicts one: the worst case), and the
observer's whole `finished` with the inventory on and off. The issue's budget: ~2 µs.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.observe_cost import per_call_us
from sidecar.config import Config, Inventory, Log
from sidecar.observe import log as log_module
from sidecar.observe.inventory import Inventory as Destinations
from sidecar.observe.observer import Exchange, Observer


def exchanges(destinations: int) -> list[Exchange]:
    now = time.perf_counter()
    return [Exchange(start=now, method="GET", path="/x", route="-" if index % 2 else "github",
                     upstream=f"api{index}.example.com:443", status=200, bytes_in=0, bytes_out=1234,
                     sent=now, headers=now + 0.01, end=now + 0.011) for index in range(destinations)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--destinations", type=int, default=50)
    args = parser.parse_args(argv)
    common = exchanges(args.destinations)
    inventory = Destinations(2000)
    known = per_call_us(lambda i: inventory.record(common[i % len(common)]), args.count)
    churn = exchanges(4000)
    small = Destinations(2000)
    evicting = per_call_us(lambda i: small.record(churn[i % len(churn)]), args.count)
    with open("/dev/null", "wb") as sink:
        log_module.configure(Log(format="json"), stream=sink)
        observers = {}
        for name, entries in (("off", 0), ("on", 2000)):
            config = Config(inventory=Inventory(max_entries=entries))
            observers[name] = Observer(config)
        finished = {name: per_call_us(lambda i, o=o: (o.started(common[i % len(common)]),
                                                       o.finished(common[i % len(common)])), args.count // 4)
                    for name, o in observers.items()}
    print(f"Inventory.record, {args.destinations} known destinations: {known:.2f} us/request")
    print(f"Inventory.record, every request a new destination past the bound: {evicting:.2f} us/request")
    print(f"Observer.finished (metrics + access line + inventory): off {finished['off']:.2f} us, "
          f"on {finished['on']:.2f} us, difference {finished['on'] - finished['off']:+.2f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
