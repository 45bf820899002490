"""RSS growth per failed request, our HTTP11Transport vs httpx's: `python -m bench.micro.transport_reset_memory`.

Found by the soak (tests/soak): with the own transport, requests that end in an upstream reset
(and client-aborted downloads) grew the sidecar's RSS without bound while Python's object
counts stayed flat. This isolates the transport: N requests (bounded in count and time) that
end in a reset before any answer, or in a download closed after its first chunk, RSS measured
before and after, for each transport and event loop. The test upstream runs in its own
process, so its memory is not counted. After the loop it prints what `gc.collect()` still
found (objects only the cyclic gc could free) and the RSS after `malloc_trim`: growth that
vanishes there was memory held by cycles awaiting the gc, not a true native leak.

Cause found with it: each failed Connection sat in reference cycles (its httptools parser
holding its bound methods; its stored error's traceback holding a frame that held it), so
only a full gc freed its socket and TLS state. Measured on the shared 2-core machine,
20,000 resets: 349 B/reset (uvloop) and 1,302 B/reset (asyncio) before the fix, ~50 B after;
5,000 aborted 1 MB downloads: 3,037 B each before, ~0 after; httpx's: ~0. What remains for
ours (~0.5-1 MiB whether 1,500 or 20,000 requests) does not scale with the count: allocator
warm-up, not a leak. Runs of a few thousand are noisy; use the default 20,000 (BENCH_COUNT).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import multiprocessing
import os
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx
import trustme
import uvloop

from sidecar.upstream.transport.transport import HTTP11Transport
from tests.servers.upstream import UpstreamServer

WARM_UP, COUNT, SECONDS = 300, int(os.environ.get("BENCH_COUNT", "20000")), 90.0
TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
CASES = {"reset": ("/reset", False), "aborted": ("/bytes?n=1000000", True)}


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


def _serve(pem: str, ports: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    ports.put(UpstreamServer(context).start().port)
    threading.Event().wait()  # until the parent kills this process


async def _growth(make: str, port: int, context: ssl.SSLContext, path: str, abort: bool) -> str:
    transport: httpx.AsyncBaseTransport = (
        HTTP11Transport(context, max_connections=8) if make == "own" else httpx.AsyncHTTPTransport(verify=context)
    )

    async def one() -> None:
        request = httpx.Request("GET", f"https://localhost:{port}{path}", extensions={"timeout": TIMEOUTS})
        try:
            response = await transport.handle_async_request(request)
            if abort:
                async for _ in response.stream:  # type: ignore[attr-defined]
                    break  # the client walks away after the first chunk
            await response.aclose()
        except httpx.TransportError:
            pass

    for _ in range(WARM_UP):
        await one()
    gc.collect()
    before = _rss_kib()
    started, done = time.monotonic(), 0
    while done < COUNT and time.monotonic() - started < SECONDS:
        await one()
        done += 1
    grown = _rss_kib() - before
    garbage_before = len(gc.get_objects())
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    cyclic = Counter(type(o).__name__ for o in gc.garbage)
    gc.set_debug(0)
    gc.garbage.clear()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = _rss_kib() - before
    await transport.aclose()
    top = ", ".join(f"{name} {n}" for name, n in cyclic.most_common(5)) or "none"
    return (f"RSS +{grown} KiB after {done} ({grown * 1024 / done:.0f} B each; +{trimmed} KiB after gc and "
            f"malloc_trim); cyclic garbage among {garbage_before} objects: {top}")


def main() -> None:
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as folder:
        pem = os.path.join(folder, "upstream.pem")
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
        ports: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
        server = multiprocessing.Process(target=_serve, args=(pem, ports), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=20)
            context = ssl.create_default_context()
            ca.configure_trust(context)
            context.set_alpn_protocols(["http/1.1"])
            for case, (path, abort) in CASES.items():
                for make in ("own", "httpx"):
                    for loop_name, run in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
                        line = run(_growth(make, port, context, path, abort))
                        print(f"{case:7} {make:5} {loop_name:7} {line}", flush=True)
        finally:
            server.kill()
            server.join(10)
    sys.exit(0)


if __name__ == "__main__":
    main()
