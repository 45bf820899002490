"""The process's own start and stop lines, and the exit codes that go with them.

The sidecar runs two uvicorn servers (data, admin); left alone each would print its own
`Started server process`, `Uvicorn running on`, `Shutting down`, `Finished server process`,
and a listener that cannot bind ends with uvicorn's `sys.exit(3)` escaping a task
("Task exception was never retrieved"). Here uvicorn's informational lines are dropped (the
sidecar logs `starting`, `started`, `draining`, `stopped` itself), its start-up errors are
captured into the one `startup_failed` line, and a second signal ends the process at once.

Exit codes: 0 after a drain, 1 when start-up failed (a port in use), 2 for a config error
(sidecar.cli), 128 + the signal number when a second signal forced the exit (130 SIGINT,
143 SIGTERM: what a shell and Kubernetes show for a process ended by that signal).
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

EXIT_STARTUP_FAILED = 1
_UVICORN = "uvicorn.error"  # uvicorn's lifecycle logger (not only errors)


def forced_exit_code(signum: int) -> int:
    """The exit status after a second signal: the shell's convention for "ended by `signum`"."""
    return 128 + signum


def quiet_uvicorn() -> None:
    """Drop uvicorn's informational lifecycle lines; its warnings and errors still reach the log."""
    logging.getLogger(_UVICORN).setLevel(logging.WARNING)


class StartupErrors(logging.Filter):
    """While installed (a context manager around start-up), uvicorn's error lines are kept here
    instead of logged, so a failed start is one `startup_failed` line that quotes them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.messages.append(record.getMessage())
            return False
        return True

    def __enter__(self) -> StartupErrors:
        logging.getLogger(_UVICORN).addFilter(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        logging.getLogger(_UVICORN).removeFilter(self)


class ListenerFailed(Exception):
    """A uvicorn server stopped during start-up (it reports that with `sys.exit`)."""


async def serve(server: Any, sockets: Any = None) -> None:
    """`server.serve(sockets)`, with uvicorn's start-up `SystemExit` turned into ListenerFailed.

    A SystemExit raised in a task escapes the event loop itself; as an ordinary exception
    it stays in the task, where the caller reads it.
    """
    try:
        await server.serve(sockets=sockets)
    except SystemExit as exc:
        raise ListenerFailed(f"uvicorn exited with {exc.code}") from None


def exit_now(code: int) -> None:
    """End the process at once: no drain, no cleanup beyond the log lines already written."""
    os._exit(code)
