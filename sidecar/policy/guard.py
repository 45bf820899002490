"""The connect guard for httpx's stock transport: an httpcore network backend that dials only
addresses the egress policy has checked.

httpcore asks its network backend to `connect_tcp(host, port)` with the origin's host name,
then calls `start_tls(server_hostname=<origin host>)` on the stream it got back
(httpcore/_async/connection.py `_connect`). Wrapping the backend is therefore the one place
where the resolved address can be checked and then used: this backend resolves through
`resolve` (EgressPolicy.resolve: every address checked, any denied -> PolicyDenied) and
connects to those addresses, in order, while SNI and certificate verification still use the
host name. The policy's PolicyDenied is not an httpcore exception, so httpx passes it through
unchanged to the forward path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpcore
import httpx
from httpcore import AsyncNetworkBackend, AsyncNetworkStream

from sidecar._compat.httpcore import set_network_backend
from sidecar.upstream.transport.connect import Resolve  # one definition for both transports


class GuardedBackend(AsyncNetworkBackend):
    """A network backend that connects only to addresses returned by `resolve`."""

    def __init__(self, resolve: Resolve, inner: AsyncNetworkBackend | None = None) -> None:
        self._resolve = resolve
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            # The connect timeout covers name resolution too, as it would inside getaddrinfo.
            addresses = await asyncio.wait_for(self._resolve(host, port), timeout)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        last_error: Exception = httpcore.ConnectError(f"no address for {host}")
        for index, address in enumerate(addresses):
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host} timed out")
            # Share what is left of the deadline among the addresses still to try, so one
            # black-holed address (say, IPv6 without a working route) cannot use it all up.
            attempt = None if remaining is None else remaining / (len(addresses) - index)
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=attempt, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc  # try the next checked address, as getaddrinfo users do
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def guard_transport(transport: httpx.AsyncHTTPTransport, resolve: Resolve) -> httpx.AsyncHTTPTransport:
    """Make `transport` dial through GuardedBackend; returns it. Call before first use.

    httpx's AsyncHTTPTransport takes no network backend, so the one its connection pool hands
    to each new connection is replaced (sidecar/_compat/httpcore.py); this fails loudly if the
    attribute ever moves.
    """
    set_network_backend(transport, GuardedBackend(resolve))
    return transport
