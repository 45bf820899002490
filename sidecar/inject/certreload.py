"""Reload the injector's TLS certificate when its files change (cert-manager renewals).

Kubernetes updates a mounted Secret by swapping a symlink, so the files' identity (inode,
mtime, size, following links) changes. The check is two stat calls and runs before each request;
the kubelet's HTTPS probes every few seconds guarantee requests even when the API server sends
none. The new chain is loaded into the server's one SSLContext: handshakes after that use it,
open connections keep the certificate they were made with.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

Fingerprint = tuple[tuple[int, int, int], ...]


def fingerprint(*paths: str) -> Fingerprint:
    """Identity of the files as they are now; a missing file counts as (0, 0, 0)."""
    marks = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            marks.append((0, 0, 0))
        else:
            marks.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(marks)


class CertReloader:
    """Loads cert and key into `context` again when their files change."""

    def __init__(self, cert: str, key: str, on_reload: Callable[[str | None], None]) -> None:
        self._context: ssl.SSLContext | None = None
        self._cert, self._key = cert, key
        self._seen = fingerprint(cert, key)
        self._on_reload = on_reload  # called with None on success, or the error text

    def attach(self, context: ssl.SSLContext) -> None:
        """The server's context, known once uvicorn has loaded the certificate."""
        self._context = context

    def check(self) -> bool:
        """Reload if the files changed; True when a new certificate is in use."""
        now = fingerprint(self._cert, self._key)
        if self._context is None or now == self._seen:
            return False
        self._seen = now
        try:
            self._context.load_cert_chain(self._cert, self._key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # A half-written pair (cert updated, key not yet): keep serving the old one and
            # try again when the files change once more.
            self._on_reload(str(exc))
            return False
        self._on_reload(None)
        return True
