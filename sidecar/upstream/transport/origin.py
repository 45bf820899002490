"""Where a connection goes: scheme, host and port (the pool's key), and the name TLS checks.

A plain value shared by the pool (which keys its records by it), the connection (which dials
it) and the connect step; it knows nothing of either.
"""

from __future__ import annotations

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
