"""`egress-sidecar inject`: run the webhook app under uvicorn over TLS."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import uvicorn
import uvloop

from sidecar._compat.uvicorn import SignalFreeServer  # uvicorn.Server that leaves signals to us
from sidecar.config import Log
from sidecar.inject import settings as settings_module
from sidecar.inject.app import ASGIApp, Receive, Scope, Send, make_app
from sidecar.inject.certreload import CertReloader
from sidecar.observe import log as log_module


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen before uvicorn starts, so the real port (port 0: the OS picks) can be logged
    and a client that connects right after that line waits in the backlog instead of failing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    return sock


def _with_reload(app: ASGIApp, reloader: CertReloader) -> ASGIApp:
    async def reloading(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reloader.check()
        await app(scope, receive, send)

    return reloading


def serve(*, cert: str, key: str, host: str, port: int, settings: str | None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    log_module.configure(Log())  # the sidecar's format: JSON lines (console on a TTY)
    log = log_module.get("egress_sidecar.inject")
    if settings is None:
        print(
            "egress-sidecar inject: --settings FILE is required (the Helm chart renders it)", file=sys.stderr
        )
        return 2
    try:
        loaded = settings_module.load(settings)
    except settings_module.SettingsError as exc:
        print(f"egress-sidecar inject: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(host, port)
    except OSError as exc:
        print(f"egress-sidecar inject: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2

    def reloaded(error: str | None) -> None:
        if error is None:
            log.info("inject.certificate_reloaded", cert=cert)
        else:
            log.warning("inject.certificate_reload_failed", cert=cert, error=error)

    reloader = CertReloader(cert, key, reloaded)
    config = uvicorn.Config(
        _with_reload(make_app(loaded), reloader),
        ssl_certfile=cert,
        ssl_keyfile=key,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    try:
        config.load()  # loads the certificate now, so a bad one is one clear line, not a traceback
    except (OSError, ValueError) as exc:
        print(
            f"egress-sidecar inject: cannot load TLS certificate {cert} / key {key}: {exc}", file=sys.stderr
        )
        sock.close()
        return 2
    assert config.ssl is not None  # ssl_certfile was given
    reloader.attach(config.ssl)
    log.info(
        "inject.listening",
        host=host,
        port=sock.getsockname()[1],
        image=loaded.container["image"],
        native=loaded.native,
    )
    uvloop.run(_serve_until_signal(SignalFreeServer(config), sock))
    return 0


async def _serve_until_signal(server: uvicorn.Server, sock: socket.socket) -> None:
    """SIGTERM/SIGINT: finish open requests and exit 0 (uvicorn's own handling would re-raise
    the signal and end the process with it)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, setattr, server, "should_exit", True)
    await server.serve(sockets=[sock])
