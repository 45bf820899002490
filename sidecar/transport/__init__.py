"""Our HTTP/1.1 upstream transport (httpx API, uvloop protocols, httptools parser).

HTTP/2 routes keep httpx's stock `AsyncHTTPTransport(http2=True)`; everything else goes
through `HTTP11Transport`. Modules: `wire` (pure request encoding and retry rule),
`connection` (the asyncio.Protocol), `pool` (slots, idle stacks, wait queue), `connect`
(resolve, TCP, TLS) and `transport` (the httpx.AsyncBaseTransport tying them together).
"""

from sidecar.transport.connect import Resolve
from sidecar.transport.transport import HTTP11Transport, ResponseStream

__all__ = ["HTTP11Transport", "Resolve", "ResponseStream"]
