"""Opt-in TLS interception: which tunnels the sidecar terminates, and the CA it does it with.

A CONNECT tunnel carries the app's own TLS, so none of the sidecar's per-request work applies
to it. For the names listed in `intercept.hosts` or a route's `match_hosts` (exact names or
`*.suffix`, matched like host rules) the sidecar completes the app's TLS handshake itself with
a leaf of its per-pod CA (sidecar/intercept/ca.py) and serves the decrypted requests like a
forwarded `http://` request. Every other name stays a plain tunnel, byte for byte.

Nothing here is imported, and no CA exists, unless interception is configured.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import Config
from sidecar.intercept.terminate import terminate
from sidecar.policy.addresses import parse_ip_literal
from sidecar.policy.hostnames import HostPatterns, canonical_host

# report(kind, method, target, detail), as sidecar.ingress.protocol.Report (not imported: limits imports tunnel).
Report = Callable[[str, str, str, str], None]

if TYPE_CHECKING:
    import ssl

    from sidecar.intercept.ca import InterceptCA
    from sidecar.tunnel.tunnels import TunnelRecord, Tunnels


def intercepted_patterns(config: Config) -> list[str]:
    """`intercept.hosts` plus every route's `match_hosts`, in order, duplicates and IP literals dropped.

    An IP literal in `match_hosts` still selects the route for forwarded requests; it is never
    intercepted (the CA excludes every address, so the app could not trust such a leaf).
    """
    patterns: dict[str, None] = {}
    for pattern in [*config.intercept.hosts, *(h for r in config.routes for h in r.match_hosts)]:
        text = pattern.strip()
        wildcard = text.startswith("*.")
        bare = text[2:] if wildcard else text
        if parse_ip_literal(bare) is None:
            # The canonical form (lower case, IDNA, no trailing dot): what the CA's constraints name.
            patterns[("*." if wildcard else "") + canonical_host(bare)] = None
    return list(patterns)


class Interceptor:
    """The interception decision and the CA; built once at start when interception is on."""

    def __init__(self, config: Config, ca: InterceptCA) -> None:
        self.hosts_listed = intercepted_patterns(config)
        self.hosts = HostPatterns(self.hosts_listed)
        self.ca = ca
        self.ca_dir = config.intercept.ca_dir
        self.bundle: Path | None = None
        # Set by attach() once the data listener runs; until then every tunnel stays a tunnel.
        self._listener: Callable[[], Any] | None = None
        self._handshake_timeout = 10.0
        self._report: Report = _ignore

    def intercepts(self, canonical_host: str) -> bool:
        """Whether a tunnel to this host (canonical form, sidecar.policy.hostnames) is terminated here."""
        return self.hosts.matches(canonical_host)

    def context_for(self, canonical_host: str) -> ssl.SSLContext:
        """The TLS server context to complete the app's handshake for this host."""
        return self.ca.context_for(canonical_host)

    def attach(self, tunnels: Tunnels, listener: Callable[[], Any], handshake_timeout: float,
               report: Report) -> None:
        """Become `tunnels`' interception hook. `listener()` makes a new instance of the data
        listener's protocol class with its uvicorn config and server state bound (server.py);
        `report` records a failed handshake like any refusal (log line, metric)."""
        self._listener = listener
        self._handshake_timeout = handshake_timeout
        self._report = report
        tunnels.intercept = self.take_over

    def take_over(self, record: TunnelRecord, client: asyncio.Transport, hello: bytes) -> bool:
        """The tunnel hook (tunnel.py): for an intercepted host, terminate the app's TLS on `client`
        (`hello`: the bytes it already sent) and serve what it carries with a new listener protocol
        whose requests are marked with the tunnel's authority. False: the tunnel stays a tunnel."""
        listener = self._listener
        if listener is None or not self.intercepts(record.host):
            return False
        authority = f"{record.host}:{record.port}"
        report = self._report
        try:
            context = self.context_for(record.host)
        except Exception as exc:  # noqa: BLE001 - never fall back to a tunnel: that would skip the route
            report("tls_error", "CONNECT", authority, f"cannot mint a certificate for {record.host}: {exc}")
            client.close()
            return True
        protocol = listener()
        protocol.authority = authority
        handshake = terminate(client, hello, context, protocol, self._handshake_timeout)

        def finished(future: asyncio.Future[None]) -> None:
            error = None if future.cancelled() else future.exception()
            if error is not None:  # typically: the app does not trust the CA (no SSL_CERT_FILE & co.)
                report("tls_error", "CONNECT", authority, f"interception handshake with the app failed: {error}")

        handshake.add_done_callback(finished)
        return True

    def write_files(self, roots_pem: bytes) -> Path:
        """Write the CA certificate and the trust bundle to `intercept.ca_dir` (at start, before ready)."""
        self.bundle = self.ca.write(self.ca_dir, roots_pem)
        return self.bundle

    def unready(self) -> str | None:
        """For /readyz: why interception cannot serve (the bundle the app containers wait for is
        missing, or the CA has expired: its leaves would fail everywhere), or None."""
        if self.bundle is None or not self.bundle.is_file():
            return "interception CA bundle missing"
        if time.time() >= self.ca.not_after.timestamp():
            return "interception CA expired (intercept.ca_validity): restart the pod"
        return None


def _ignore(kind: str, method: str, target: str, detail: str) -> None:
    return None


def build_interceptor(config: Config) -> Interceptor | None:
    """The Interceptor for `config`, or None (and `cryptography` never imported) when off."""
    patterns = intercepted_patterns(config)
    if not patterns:
        return None
    from sidecar.intercept.ca import InterceptCA  # lazily: see intercept_ca's module doc

    ca = InterceptCA(patterns, float(config.intercept.ca_validity), config.intercept.leaf_cache,
                     label=socket.gethostname())
    return Interceptor(config, ca)
