"""Terminating an app's TLS inside a tunnel, then serving it with the listener's own HTTP protocol.

After the `200 Connection Established` the tunnel has already read the app's ClientHello (that is
where the SNI comes from), so `loop.start_tls` cannot be used: it would start a handshake on a
transport whose first bytes are gone. Instead the TLS protocol start_tls would build is built
here, put on the transport, and handed the ClientHello first. Once the handshake is done it
calls `connection_made` on a fresh instance of the listener's httptools protocol
(sidecar/ingress/protocol.py) with the decrypted transport, so every request inside goes through the same
ASGI app as a forwarded `http://` request; its scope carries the tunnel's authority under
`routing.INTERCEPTED`, and uvicorn marks it `scheme: https` (the transport is TLS).

The one seam onto another library's internals (STYLE.md): `uvloop.loop.SSLProtocol`, the
Cython class behind uvloop's `start_tls` (uvloop 0.19-0.x; asyncio's `sslproto.SSLProtocol`,
the same code in Python, on other loops). Used: its constructor `(loop, app_protocol,
sslcontext, waiter, server_side, server_hostname, call_connection_made, ssl_handshake_timeout)`
and the BufferedProtocol calls `get_buffer`/`buffer_updated`. tests/unit/test_intercept_tls.py
runs a real handshake through it and fails, naming this module, if that moves.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any

from sidecar.proxy.routing import INTERCEPTED

try:
    import uvloop
    from uvloop.loop import SSLProtocol as _UVLoopSSLProtocol  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's class serves other loops
    uvloop = None  # type: ignore[assignment]
    _UVLoopSSLProtocol = None


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    if _UVLoopSSLProtocol is not None and isinstance(loop, uvloop.Loop):
        return _UVLoopSSLProtocol
    return sslproto.SSLProtocol


_INTERCEPTING: dict[type[Any], type[Any]] = {}


def intercepting_protocol(base: type[Any]) -> type[Any]:
    """The listener's protocol class, marking each request's scope with the tunnel's authority
    (made once per listener class)."""
    made = _INTERCEPTING.get(base)
    if made is not None:
        return made

    class InterceptingProtocol(base):  # type: ignore[misc]
        authority = ""  # set per instance, before connection_made
        tunnels = None  # no nested tunnels: a CONNECT inside is refused (400 bad_request)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[INTERCEPTED] = self.authority

    InterceptingProtocol.__name__ = f"Intercepting{base.__name__}"
    _INTERCEPTING[base] = InterceptingProtocol
    return InterceptingProtocol


def terminate(
    transport: asyncio.BaseTransport,
    first_bytes: bytes,
    context: ssl.SSLContext,
    app_protocol: asyncio.BaseProtocol,
    handshake_timeout: float,
) -> asyncio.Future[None]:
    """Serve TLS on `transport` with `context`; `first_bytes` are what the app already sent (its
    ClientHello). Returns the handshake's future: done when `app_protocol.connection_made` has
    been called with the decrypted transport, or failed (the transport is then closed)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    protocol = _ssl_protocol_class(loop)(
        loop, app_protocol, context, waiter, True, None, True, handshake_timeout,
    )
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if first_bytes:
        buffer = protocol.get_buffer(len(first_bytes))
        if len(buffer) < len(first_bytes):  # pragma: no cover - both classes size it to the hint or more
            raise RuntimeError("TLS protocol buffer smaller than the ClientHello")
        buffer[: len(first_bytes)] = first_bytes
        protocol.buffer_updated(len(first_bytes))
    return waiter
