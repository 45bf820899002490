"""Micro-benchmark: what TLS interception's CA costs (sidecar/intercept/ca.py).

Measures, in this process, bounded in count:
- creating the per-pod CA at start (two P-256 keys, the self-signed constrained certificate);
- minting one leaf on a cache miss (certificate signed, PEM, memfd, SSLContext, load_cert_chain);
- a cache hit (`context_for` of a name already minted): what every intercepted tunnel pays;
- a full server-side TLS handshake with a minted leaf over memory BIOs (both ends in-process):
  the per-connection cost the app pays once per connection it keeps alive.

    .venv/bin/python -m bench.intercept_mint [--leaves 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import ssl
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.intercept.ca import InterceptCA


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    for _ in range(10):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if done_c and done_s:
            return
    raise RuntimeError("handshake did not finish")


def _per_call_us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_us": round(statistics.median(ordered) * 1e6, 1),
            "p90_us": round(ordered[int(len(ordered) * 0.9)] * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, default=300, help="leaves minted (cache misses)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    starts = []
    for _ in range(10):
        t0 = time.perf_counter()
        ca = InterceptCA(["*.bench.test"], validity=86400, cache_size=args.leaves + 1)
        starts.append(time.perf_counter() - t0)
    misses = []
    for i in range(args.leaves):
        t0 = time.perf_counter()
        ca.context_for(f"h{i}.bench.test")
        misses.append(time.perf_counter() - t0)
    hits = []
    for i in range(args.leaves * 10):
        t0 = time.perf_counter()
        ca.context_for(f"h{i % args.leaves}.bench.test")
        hits.append(time.perf_counter() - t0)
    client = ssl.create_default_context(cadata=ca.certificate_pem.decode())
    handshakes = []
    for _ in range(min(args.leaves, 200)):
        t0 = time.perf_counter()
        _handshake(ca.context_for("h0.bench.test"), client, "h0.bench.test")
        handshakes.append(time.perf_counter() - t0)
    results = {
        "ca_start": _per_call_us(starts),
        "leaf_mint_miss": _per_call_us(misses),
        "leaf_cache_hit": _per_call_us(hits),
        "tls_handshake_both_ends": _per_call_us(handshakes),
        "leaves": args.leaves,
    }
    for name, value in results.items():
        print(f"{name:26} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
