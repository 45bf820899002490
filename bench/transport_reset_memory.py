"""RSS growth per upstream reset, our HTTP11Transport vs httpx's: `python -m bench.transport_reset_memory`.

Found by the soak (tests/soak): with the own transport, requests that end in an upstream reset
(and client-aborted downloads) grow the sidecar's RSS without bound (~4 KB per reset through
the sidecar; Python's allocated blocks stay flat, so the memory is native). This isolates the
transport: N requests to a test upstream path that resets the connection before answering,
RSS measured before and after, for each transport and event loop. The baseline (httpx) growth
is the test upstream's own request records, which live in this process too.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import httpx
import trustme
import uvloop

from sidecar.transport.transport import HTTP11Transport
from tests.conftest import server_context
from tests.upstream import UpstreamServer

WARM_UP, COUNT = 300, 4000
TIMEOUTS = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


async def _growth(make: str, port: int, context: ssl.SSLContext) -> int:
    transport: httpx.AsyncBaseTransport = (
        HTTP11Transport(context, max_connections=8) if make == "own" else httpx.AsyncHTTPTransport(verify=context)
    )

    async def one() -> None:
        request = httpx.Request("GET", f"https://localhost:{port}/reset", extensions={"timeout": TIMEOUTS})
        try:
            response = await transport.handle_async_request(request)
            await response.aclose()
        except httpx.TransportError:
            pass

    for _ in range(WARM_UP):
        await one()
    before = _rss_kib()
    for _ in range(COUNT):
        await one()
    return _rss_kib() - before


def main() -> None:
    ca = trustme.CA()
    server = UpstreamServer(server_context(ca))
    upstream = server.start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    try:
        for make in ("own", "httpx"):
            for loop_name, run in (("uvloop", uvloop.run), ("asyncio", asyncio.run)):
                grown = run(_growth(make, upstream.port, context))
                upstream.requests.clear()
                print(f"{make:5} {loop_name:7} RSS +{grown} KiB after {COUNT} resets "
                      f"({grown * 1024 / COUNT:.0f} B each)", flush=True)
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
