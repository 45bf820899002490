"""The seam onto the event loop's TLS protocol (sidecar/intercept/terminate.py), with real sockets.

A bare TCP server reads the client's first flight (its ClientHello) itself, as the tunnel does,
then hands the connection and those bytes to `terminate`: the TLS handshake must complete with
the minted leaf, ALPN http/1.1, and bytes must flow both ways through the app protocol. If
uvloop's SSLProtocol changes its constructor or buffered-protocol calls, this fails: re-read
uvloop/sslproto.pyx and adjust sidecar/intercept/terminate.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import pytest
import uvloop

from sidecar.intercept.ca import InterceptCA
from sidecar.intercept.terminate import intercepting_protocol, terminate
from sidecar.proxy.routing import INTERCEPTED

CA = InterceptCA(["*.seam.test"], validity=3600, cache_size=4)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TLS transport is no asyncio.Transport subclass
        self.ssl_object = transport.get_extra_info("ssl_object")
        # What uvicorn's is_ssl() reads to set the scope's scheme to https; and the client address.
        self.tls = bool(transport.get_extra_info("sslcontext"))
        self.peer = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)  # type: ignore[attr-defined]


class FirstFlight(asyncio.Protocol):
    """Reads the ClientHello, then terminates TLS on the same transport with those bytes."""

    def __init__(self, done: asyncio.Future[Echo]) -> None:
        self.done = done
        self.app = Echo()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        handshake = terminate(self.transport, data, CA.context_for("a.seam.test"), self.app, 5.0)
        handshake.add_done_callback(lambda f: self.done.set_result(self.app) if f.exception() is None
                                    else self.done.set_exception(f.exception()))  # type: ignore[arg-type]


async def exchange() -> tuple[bytes, str | None, str | None]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Echo] = loop.create_future()
    server = await loop.create_server(lambda: FirstFlight(done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cadata=CA.certificate_pem.decode())
    client.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="a.seam.test")
    writer.write(b"ping")
    answer = await asyncio.wait_for(reader.readexactly(9), 5)
    app = await asyncio.wait_for(done, 5)
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    server.close()
    assert app.tls and app.peer[0] == "127.0.0.1"
    return answer, alpn, app.ssl_object.selected_alpn_protocol() if app.ssl_object else None


@pytest.mark.parametrize("run", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_tls_is_terminated_after_the_clienthello_was_read(run: Callable[..., object]) -> None:
    assert run(exchange()) == (b"echo:ping", "http/1.1", "http/1.1")


def test_the_intercepting_protocol_marks_every_scope_with_the_tunnel_authority() -> None:
    class Base:
        scope: dict[str, object]

        def on_message_begin(self) -> None:
            self.scope = {"type": "http"}

    cls = intercepting_protocol(Base)
    assert intercepting_protocol(Base) is cls  # built once per listener class
    protocol = cls()
    protocol.authority = "a.seam.test:443"
    protocol.on_message_begin()
    assert protocol.scope == {"type": "http", INTERCEPTED: "a.seam.test:443"}
