"""What the sidecar's start-up costs: import time (`python -X importtime`) and RSS per package.

    python -m bench.imports            # top imports by cumulative time, then RSS added by each package

Idle RSS (issue 3 goal: <= 45 MiB) and time to ready (<= 0.5 s) are mostly imports; this shows
which ones. Each RSS figure is a fresh interpreter's VmRSS after importing the package alone,
minus a bare interpreter's, so shared dependencies count in every package that pulls them in.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

ENTRY = "sidecar.cli, sidecar.server"
PACKAGES = ["uvloop", "uvicorn", "httptools", "httpx", "h2.connection", "httpcore", "anyio", "structlog", "msgspec",
            "yaml", "prometheus_client", "sidecar.server"]
_RSS = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"


def top_imports(entry: str, count: int) -> list[tuple[int, int, str]]:
    """(cumulative µs, self µs, module) for the `count` slowest imports of `import entry`."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {entry}"],
                          capture_output=True, text=True, timeout=60, check=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.+)$", line)
        if match:
            rows.append((int(match.group(2)), int(match.group(1)), match.group(3).rstrip()))
    return sorted(rows, reverse=True)[:count]


def rss_kib(module: str | None) -> int:
    code = (f"import {module}; " if module else "") + _RSS
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    print(f"## Slowest imports of `import {ENTRY}` (cumulative ms, self ms)\n")
    for cumulative, own, module in top_imports(ENTRY, args.top):
        print(f"{cumulative / 1000:8.1f} {own / 1000:7.1f}  {module}")
    base = rss_kib(None)
    print(f"\n## RSS added by importing each package alone (bare interpreter: {base / 1024:.1f} MiB)\n")
    for module in PACKAGES:
        try:
            print(f"{(rss_kib(module) - base) / 1024:8.1f} MiB  {module}")
        except subprocess.CalledProcessError:
            print(f"{'–':>8}      {module} (not importable)")


if __name__ == "__main__":
    main()
