"""What the head limits (sidecar/ingress/protocol.py) cost per request, in process: `python -m bench.micro.limits_overhead`.

Feeds the same keep-alive request (12 header fields, one read) to uvicorn's HttpToolsProtocol
and to our LimitedHttpToolsProtocol over a transport that discards writes, with a trivial ASGI
app, and reports the CPU time per request of each (median of alternating rounds) and the
difference. No sockets: the difference is the subclass, not the kernel or the machine's noise.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from sidecar.config import Limits
from sidecar.ingress.protocol import protocol_class

REQUEST = (
    b"GET /up/100b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:15001\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n"
    b"Accept-Encoding: gzip\r\nX-Request-Id: 0123456789abcdef\r\nAuthorization: Bearer abcdefghijklmnop\r\n"
    b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\nX-D: 4\r\nX-E: 5\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-"
    b"b7ad6b7169203331-01\r\n\r\n"
)
ROUNDS, PER_ROUND = 7, 5000


_EXTRA = {"sockname": ("127.0.0.1", 15001), "peername": ("127.0.0.1", 40000)}


class _NullTransport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return _EXTRA.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _per_request(cls: type[HttpToolsProtocol], count: int) -> float:
    config = uvicorn.Config(_app, http=cls, loop="none", lifespan="off", access_log=False, log_config=None,
                            server_header=False, date_header=False)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(_NullTransport())
    started = time.process_time()
    for _ in range(count):
        protocol.data_received(REQUEST)
        while not protocol.cycle.response_complete:
            await asyncio.sleep(0)
    elapsed = time.process_time() - started
    protocol.connection_lost(None)
    return elapsed / count


async def _main() -> None:
    limited = protocol_class(Limits(), lambda *args: None)
    results: dict[str, list[float]] = {"uvicorn": [], "limited": []}
    for _ in range(ROUNDS):
        results["uvicorn"].append(await _per_request(HttpToolsProtocol, PER_ROUND))
        results["limited"].append(await _per_request(limited, PER_ROUND))
    base, ours = (statistics.median(results[name]) * 1e6 for name in ("uvicorn", "limited"))
    print(f"uvicorn HttpToolsProtocol:   {base:6.2f} us/request (median of {ROUNDS} x {PER_ROUND})")
    print(f"LimitedHttpToolsProtocol:    {ours:6.2f} us/request")
    print(f"difference:                  {ours - base:+6.2f} us/request ({(ours - base) / base:+.1%})")


if __name__ == "__main__":
    uvloop.run(_main())
