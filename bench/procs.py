"""Processes the benchmark starts: spawn pinned to a CPU, read their CPU time and memory, stop them.

Everything here reads /proc directly (no psutil) so the numbers mean exactly what the report
says: CPU is utime+stime of a process and all its live descendants (nginx's workers, any
uvicorn worker), RSS is the sum of VmRSS over the same tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


class Deadline(Exception):
    """A condition did not become true in time."""


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.005) -> T:
    """Poll `condition` until it returns something truthy; raise Deadline naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except OSError as exc:  # connection refused etc. while a server is still starting
            last_error = exc
        if time.monotonic() >= end:
            detail = f" (last error: {last_error})" if last_error else ""
            raise Deadline(f"{what} not reached within {timeout:g}s{detail}")
        time.sleep(interval)  # polling interval of a condition with a deadline, not synchronisation


def free_ports(count: int) -> list[int]:
    """Ephemeral ports the OS hands out now (held together so they differ, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """argv run under `taskset -c CPU` (taskset execs, so the PID is the program's own)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


@dataclass
class Started:
    """A process we spawned: its Popen, when it was spawned, and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    spawned_at: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> bool:
        """True while running; raises (stopping any wait) once it has exited."""
        if self.popen.poll() is not None:
            last = self.log_tail(1).strip() or "(no output)"
            raise RuntimeError(f"{self.name} exited with status {self.popen.returncode}: {last}")
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> Started:
    """Start argv in its own session with stdout+stderr to log_path."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed by the OS when we drop it
    try:
        spawned_at = time.monotonic()
        popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=cwd, env=env, start_new_session=True)
    finally:
        log.close()
    return Started(name=name, popen=popen, spawned_at=spawned_at, log_path=log_path)


def descendants(pid: int) -> list[int]:
    """pid and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime+stime (all threads) of pid and its live descendants, plus children they reaped."""
    total = 0
    for member in descendants(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[11..14] = utime stime cutime cstime (proc(5) fields 14-17)
        total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_of(pids: Sequence[int]) -> int:
    """Sum of VmRSS over the given processes (shared pages counted per process, like `ps`)."""
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def rss_bytes(pid: int) -> int:
    """Sum of VmRSS over pid's tree."""
    return rss_of(descendants(pid))


def hwm_bytes(pid: int) -> int:
    """VmHWM (peak RSS since start) summed over pid's tree."""
    return sum(_status_kib(member, "VmHWM") for member in descendants(pid)) * 1024


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def stop(started: Started, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal our process, wait up to `grace` s, then SIGKILL whatever of its tree is left.

    The tree is recorded as (pid, start time) before signalling, so a PID the kernel has
    reused for someone else's process in the meantime is never touched.
    """
    if not started.alive():
        started.popen.wait()
        return
    tree = [(pid, _start_time(pid)) for pid in descendants(started.pid)]
    try:
        os.kill(started.pid, sig)
    except ProcessLookupError:
        pass
    try:
        started.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid, start in tree:
        if start is not None and _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    started.popen.wait(timeout=5)
