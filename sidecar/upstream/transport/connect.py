"""Opening a connection: resolve (through the egress policy's hook), TCP, then TLS.

Kept apart from the request path: it runs once per connection, not per request. TCP and TLS
are two steps (`create_connection`, then `start_tls`) so the trace hook can time each, as
httpcore's `connection.connect_tcp` / `connection.start_tls` events do. Failures become
httpx's exceptions; a TLS failure keeps its `ssl.SSLError` as `__cause__` and its text in the
message, so the caller can tell `tls_error` from `connect_error`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

import httpx

if TYPE_CHECKING:
    from sidecar.upstream.transport.connection import Connection
    from sidecar.upstream.transport.h2_connection import H2Connection

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
ConnectTrace = Callable[[str, dict[str, Any]], Awaitable[None]]

# asyncio's own default when no handshake timeout is given; a None connect timeout still
# should not let a silent peer hold a slot forever.
_DEFAULT_HANDSHAKE_TIMEOUT = 60.0


def endpoint(host: str, port: int) -> str:
    """`[::1]:8443` for an IPv6 address (RFC 3986 3.2.2); kept here, not imported from
    sidecar.policy.hostnames, because transports import nothing of the sidecar (tests/unit/test_layering.py)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_HTTP11_ONLY = frozenset({None, "http/1.1"})

# The protocol object being connected.
Dialable = Union["Connection", "H2Connection"]


class Endpoint(Protocol):
    """Where to connect (the pools' origins)."""

    host: str
    port: int
    tls: bool
    server_hostname: str


async def open_connection(
    conn: Dialable,
    origin: Endpoint,
    ssl_context: ssl.SSLContext | None,
    resolve: Resolve | None,
    timeout: float | None,
    trace: ConnectTrace | None,
    alpn: Collection[str | None] = _HTTP11_ONLY,
) -> None:
    """Connect `conn` to `origin`; on failure the socket is closed and an httpx error raised.
    `alpn`: the protocols the caller can speak on it (what the server selected is then read
    from the transport's `ssl_object`)."""
    await _traced(
        trace, "connection.connect_tcp",
        {"host": origin.host, "port": origin.port, "local_address": None, "timeout": timeout,
         "socket_options": None},
        _connect_tcp(conn, origin, resolve, timeout), conn,
    )
    if not origin.tls:
        return
    assert ssl_context is not None
    await _traced(
        trace, "connection.start_tls",
        {"ssl_context": ssl_context, "server_hostname": origin.server_hostname, "timeout": timeout},
        _start_tls(conn, origin, ssl_context, timeout, alpn), conn,
    )


async def _traced(
    trace: ConnectTrace | None, event: str, info: dict[str, Any], step: Awaitable[None], conn: Dialable
) -> None:
    """Run one connect step between httpcore's `.started` and `.complete`/`.failed` trace events."""
    if trace is None:
        await step
        return
    await trace(f"{event}.started", info)
    try:
        await step
    except BaseException as exc:
        await trace(f"{event}.failed", {"exception": exc})
        raise
    await trace(f"{event}.complete", {"return_value": conn.transport})


async def _connect_tcp(conn: Dialable, origin: Endpoint, resolve: Resolve | None, timeout: float | None) -> None:
    await dial(conn.loop, lambda: conn, origin.host, origin.port, resolve, timeout)


async def dial(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    resolve: Resolve | None,
    timeout: float | None,
) -> tuple[asyncio.Transport, str]:
    """TCP-connect to `host:port` through the policy's hook: (transport, the address dialled).

    The hook decides which addresses may be dialled and they are tried in order; its own
    exception (a denial) propagates unchanged. The timeout covers resolution too. Failures
    are httpx's ConnectError / ConnectTimeout (the pooled transport and the CONNECT tunnel
    report them alike).
    """
    deadline = None if timeout is None else loop.time() + timeout
    where = endpoint(host, port)
    if resolve is None:
        addresses: Sequence[str] = [host]  # the loop resolves it (getaddrinfo)
    else:
        try:
            async with asyncio.timeout_at(deadline):
                addresses = await resolve(host, port)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpx.ConnectError(f"no address to connect to for {host}")
    last: OSError | None = None
    for index, address in enumerate(addresses):
        # What is left of the deadline is shared among the addresses still to try, so one
        # black-holed address cannot use it all up (the same rule as sidecar/policy/guard.py).
        attempt = None
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            attempt = remaining / (len(addresses) - index)
        try:
            async with asyncio.timeout(attempt):
                transport, _protocol = await loop.create_connection(factory, address, port)
            return transport, address
        except TimeoutError as exc:
            last = exc
        except OSError as exc:  # refused, unreachable, DNS failure (socket.gaierror)
            last = exc
    if last is None or isinstance(last, TimeoutError):
        raise httpx.ConnectTimeout(f"timed out connecting to {where}") from None
    raise httpx.ConnectError(f"{where}: {last}") from last


async def _start_tls(
    conn: Dialable, origin: Endpoint, context: ssl.SSLContext, timeout: float | None, alpn: Collection[str | None]
) -> None:
    raw = conn.transport
    assert raw is not None
    try:
        async with asyncio.timeout(timeout):
            tls = await conn.loop.start_tls(
                raw, conn, context,
                server_hostname=origin.server_hostname,
                ssl_handshake_timeout=timeout if timeout is not None else _DEFAULT_HANDSHAKE_TIMEOUT,
            )
    except TimeoutError:
        raw.abort()
        raise httpx.ConnectTimeout(f"TLS handshake with {endpoint(origin.host, origin.port)} timed out") from None
    except ssl.SSLError as exc:
        # ssl.SSLCertVerificationError included: "[SSL: CERTIFICATE_VERIFY_FAILED] ...".
        raw.abort()
        raise httpx.ConnectError(f"TLS handshake with {endpoint(origin.host, origin.port)} failed: {exc}") from exc
    except ConnectionAbortedError as exc:
        raw.abort()
        if "handshake is taking longer" in str(exc):  # asyncio's own handshake timeout
            raise httpx.ConnectTimeout(f"TLS handshake with {endpoint(origin.host, origin.port)} timed out") from exc
        raise httpx.ConnectError(f"TLS handshake with {endpoint(origin.host, origin.port)} failed: {exc}") from exc
    except OSError as exc:
        raw.abort()
        raise httpx.ConnectError(f"TLS handshake with {endpoint(origin.host, origin.port)} failed: {exc}") from exc
    except BaseException:
        raw.abort()
        raise
    if tls is None:  # the peer closed during the handshake
        raise httpx.ConnectError(f"TLS handshake with {endpoint(origin.host, origin.port)} failed: connection closed")
    ssl_object = tls.get_extra_info("ssl_object")
    protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if protocol not in alpn:
        # Only if the context offered more than http/1.1: this transport speaks nothing else.
        tls.abort()
        raise httpx.ConnectError(f"{endpoint(origin.host, origin.port)} negotiated {protocol!r}, not http/1.1")
    conn.transport = tls
