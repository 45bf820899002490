"""Structured logging: JSON lines (console rendering on a TTY), configured once at start."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from sidecar.config import Log

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(settings: Log) -> None:
    """Route structlog and the stdlib loggers (uvicorn's, ours) to one stream in one format."""
    level = _LEVELS[settings.level]
    console = settings.format == "console" or (settings.format == "auto" and sys.stdout.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Stdlib loggers (uvicorn's, our warnings) through the same renderer.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
                renderer,
            ],
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log is off; ours is one structured line per request.
    logging.getLogger("uvicorn.access").disabled = True


def get(name: str) -> Any:
    return structlog.get_logger(name)
