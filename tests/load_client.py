"""A bounded load generator for the burst and soak tests: run as `python -m tests.load_client`.

Sends requests through the sidecar from `--concurrency` workers, each with its own
httpx.AsyncClient (one keep-alive connection), stops after `--total` requests or `--seconds`, whichever comes first, and
prints one JSON summary: outcomes by name, and the first few unexpected ones in detail.

Request mixes (`--mix name=weight,...`), each with the outcome it must have:
- ok:    GET {prefix}/bytes?n=2048&seed=7 -> 200 and exactly those bytes
- error: GET {prefix}/reset -> 502 with x-egress-error: upstream_reset
- abort: GET {prefix}/slow?n=50&interval=0.02, dropped after the first chunk (client abort)
- post:  POST {prefix}/echo with 16 KiB -> 200, the upstream saw all of it
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import json
import random
import ssl
import sys
import time

import httpx
import uvloop

OK_BYTES = random.Random(7).randbytes(2048)
POST_BODY = random.Random(8).randbytes(16384)
POST_SHA = hashlib.sha256(POST_BODY).hexdigest()


async def one(client: httpx.AsyncClient, prefix: str, kind: str) -> str:
    """Run one request of `kind`; return its outcome name (`<kind>_ok` when as expected)."""
    if kind == "ok":
        response = await client.get(f"{prefix}/bytes?n=2048&seed=7")
        return "ok_ok" if response.status_code == 200 and response.content == OK_BYTES else \
            f"ok_bad_{response.status_code}_{response.headers.get('x-egress-error', '')}"
    if kind == "error":
        response = await client.get(f"{prefix}/reset")
        good = response.status_code == 502 and response.headers.get("x-egress-error") == "upstream_reset"
        return "error_ok" if good else f"error_bad_{response.status_code}"
    if kind == "abort":
        async with client.stream("GET", f"{prefix}/slow?n=50&interval=0.02") as response:
            if response.status_code != 200:
                return f"abort_bad_{response.status_code}"
            async for _chunk in response.aiter_raw():
                break
        return "abort_ok"
    if kind == "post":
        response = await client.post(f"{prefix}/echo", content=POST_BODY)
        good = response.status_code == 200 and response.json()["body_sha256"] == POST_SHA
        return "post_ok" if good else f"post_bad_{response.status_code}"
    raise ValueError(kind)


async def run(base: str, prefix: str, total: int, concurrency: int, seconds: float, mix: list[str]) -> dict[str, object]:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    details: list[str] = []
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    # One client (one keep-alive connection) per worker: a shared client's pool costs O(connections)
    # per request in httpcore, which at 256 made this process, not the sidecar, the bottleneck.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # unused (plain HTTP to the sidecar), but httpx builds one per client otherwise
    started = time.monotonic()

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30, trust_env=False, verify=tls) as client:
            while time.monotonic() < deadline:
                index = next(counter)
                if index >= total:
                    return
                kind = mix[index % len(mix)]
                begun = time.monotonic()
                try:
                    outcome = await one(client, prefix, kind)
                except Exception as exc:  # noqa: BLE001 - any transport error is an unexpected outcome
                    outcome = f"{kind}_exception_{type(exc).__name__}"
                    if len(details) < 10:
                        details.append(f"{kind}: {exc!r}")
                outcomes[outcome] += 1
                latencies.append(time.monotonic() - begun)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {"outcomes": dict(outcomes), "details": details, "seconds": round(time.monotonic() - started, 2),
            "sent": sum(outcomes.values()),
            "latency": {"p50": _pick(latencies, 0.5), "p99": _pick(latencies, 0.99), "max": _pick(latencies, 1.0)}}


def _pick(ordered: list[float], quantile: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(quantile * len(ordered)))], 3) if ordered else 0.0


def parse_mix(text: str) -> list[str]:
    mix: list[str] = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        mix += [name] * int(weight or 1)
    random.Random(1).shuffle(mix)
    return mix


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--prefix", default="/up")
    parser.add_argument("--total", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--mix", default="ok")
    args = parser.parse_args()
    summary = uvloop.run(run(args.base, args.prefix, args.total, args.concurrency, args.seconds, parse_mix(args.mix)))
    json.dump(summary, sys.stdout)


if __name__ == "__main__":
    main()
