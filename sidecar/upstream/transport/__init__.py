"""Our upstream transports (httpx API, uvloop protocols): HTTP/1.1 and HTTP/2.

HTTP/1.1: `wire` (pure request encoding and retry rule), `connection` (the asyncio.Protocol,
httptools parser), `pool` (slots, idle stacks, wait queue), `salvage`, and `transport` (the
httpx.AsyncBaseTransport tying them together). HTTP/2: `h2_request` (pure header block and
replay rule), `h2_frames` (frames and HPACK, pure), `h2_connection` (the asyncio.Protocol), `h2_pool` (streams per connection, FIFO waiters) and
`h2_transport`. Both dial through `connect` (resolve through the policy, TCP, TLS); `origin` names
where a connection goes; `replay` keeps a body so it can be sent again.
"""

from sidecar.upstream.transport.connect import Resolve
from sidecar.upstream.transport.h2_transport import H2Transport
from sidecar.upstream.transport.transport import HTTP11Transport, ResponseStream

__all__ = ["H2Transport", "HTTP11Transport", "Resolve", "ResponseStream"]
