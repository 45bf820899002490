"""py-spy profiles of a Python candidate under load (`python -m bench.run --profile 32`).

The profile is taken in an extra wrk run after the recorded ones, so sampling never touches
the reported numbers. py-spy records collapsed stacks (`--format raw`, loadable in speedscope)
without pausing the target (`--nonblocking`); idle samples (the loop waiting in epoll) are left
out, so percentages are of the time the process was busy on the CPU.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import procs


def _py_spy() -> str | None:
    """py-spy from the running venv (the `bench` extra installs it), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _py_spy() is not None


def start(pid: int, seconds: int, out: Path, cpu: int | None) -> subprocess.Popen[bytes]:
    """Begin sampling `pid` for `seconds` at 250 Hz into `out` (collapsed stacks, frames by function)."""
    argv = procs.pinned(cpu, [_py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
                              "--rate", "250", "--format", "raw", "--nonblocking", "--function", "-o", str(out)])
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(popen: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        _, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.communicate()
        raise RuntimeError("py-spy did not finish in time") from None
    if popen.returncode != 0:
        raise RuntimeError(f"py-spy failed ({popen.returncode}): {err.decode(errors='replace').strip()}")


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top frames by self samples and by inclusive samples (each counted once per stack)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, 100.0 * n / total) for frame, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": share(own), "inclusive": share(inclusive), "raw": str(raw)}
