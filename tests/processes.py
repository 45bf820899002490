"""Stopping the processes a test started: SIGTERM, a deadline, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 15.0) -> int | None:
    """Ask `proc` to stop (SIGTERM); kill it if it has not exited within `timeout`. Returns its code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
