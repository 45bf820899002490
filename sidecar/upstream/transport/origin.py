"""Where a connection goes: scheme, host and port (the pool's key), and the name TLS checks.

A plain value shared by the pool (which keys its records by it), the connection (which dials
it) and the connect step; it knows nothing of either.
"""

from __future__ import annotations

import httpx

# (scheme, host, port) as httpx's URL gives them: b"https", b"api.example.com", None for the default.
OriginKey = tuple[bytes, bytes, int | None]


class Origin:
    """Where connections go: (scheme, host, port) and how to reach it."""

    __slots__ = ("host", "key", "port", "server_hostname", "tls")

    def __init__(self, key: OriginKey, tls: bool, host: str, port: int, server_hostname: str) -> None:
        self.key = key
        self.tls = tls
        self.host = host
        self.port = port
        self.server_hostname = server_hostname


_DEFAULT_PORTS = {b"https": 443, b"http": 80}


def origin_of(url: httpx.URL) -> tuple[OriginKey, bool, str, int]:
    """(key, tls, host, port) of a request URL, for either transport's origin record.

    Raises httpx.UnsupportedProtocol for a scheme other than http/https or a URL without a host,
    as httpcore does.
    """
    key: OriginKey = (url.raw_scheme, url.raw_host, url.port)
    scheme, host, port = key
    if scheme not in _DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
    if not host:
        raise httpx.UnsupportedProtocol("the request URL has no host")
    return key, scheme == b"https", host.decode("ascii"), port or _DEFAULT_PORTS[scheme]
