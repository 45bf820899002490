"""The ceiling: a raw-ASGI hello world under uvicorn, answering every request with 100 bytes.

No upstream, no routing: what uvicorn (uvloop + httptools) alone costs per request.
Run: uvicorn bench.peers.hello_asgi:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from typing import Any

from bench.bodies import SMALL_BODY

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(SMALL_BODY)).encode())],
}
_BODY = {"type": "http.response.body", "body": SMALL_BODY}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(_START)
    await send(_BODY)
