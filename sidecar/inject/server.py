"""`egress-sidecar inject`: run the webhook app under uvicorn over TLS."""

from __future__ import annotations

import socket
import sys

import structlog
import uvicorn

from sidecar.inject import settings as settings_module
from sidecar.inject.app import make_app


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen before uvicorn starts, so the real port (port 0: the OS picks) can be logged
    and a client that connects right after that line waits in the backlog instead of failing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    return sock


def serve(*, cert: str, key: str, host: str, port: int, settings: str | None) -> int:
    """Serve until SIGTERM/SIGINT; return the exit status."""
    structlog.configure(processors=[structlog.processors.add_log_level,
                                    structlog.processors.TimeStamper(fmt="iso"),
                                    structlog.processors.format_exc_info,
                                    structlog.processors.JSONRenderer()])
    log = structlog.get_logger("egress_sidecar.inject")
    if settings is None:
        print("egress-sidecar inject: --settings FILE is required (the Helm chart renders it)", file=sys.stderr)
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
    config = uvicorn.Config(make_app(loaded), ssl_certfile=cert, ssl_keyfile=key, loop="uvloop",
                            http="httptools", lifespan="off", access_log=False, log_level="warning",
                            server_header=False, date_header=False)
    try:
        config.load()  # loads the certificate now, so a bad one is one clear line, not a traceback
    except (OSError, ValueError) as exc:
        print(f"egress-sidecar inject: cannot load TLS certificate {cert} / key {key}: {exc}", file=sys.stderr)
        sock.close()
        return 2
    log.info("inject.listening", host=host, port=sock.getsockname()[1], image=loaded.container["image"],
             native=loaded.native)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
