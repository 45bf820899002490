"""`make mutation`: mutation testing of the pure modules with only the unit tests, one module at a time.

mutmut (configured in pyproject.toml [tool.mutmut]) changes one thing at a time in a function
body (an operator, a constant, a condition) and runs the unit tests that cover it: a mutant
the tests do not notice (survived) is behaviour nothing pins. This runs each module in turn
(mutmut is CPU-heavy; `nice -n 19`, one worker by default) and prints the score per module:
killed (a test failed, or the mutant hung past its timeout) over all mutants, less the
equivalent mutants listed in EQUIVALENT (no test can tell them apart from the original).

    python scripts/mutation.py [MODULE ...] [--children N] [--report-only]

Exit status 1 if a module scores below TARGET.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "addresses", "hostnames", "headers", "routing", "retry", "breaker", "errors", "transport.wire",
)
TARGET = 0.90
SURVIVED = 0  # mutmut's recorded exit code of the test run: 0 means every test passed
# Exit codes mutmut records for a mutant the tests caught: a test failed (1, or 3: pytest's
# internal error), or it ran past its timeout (SIGXCPU). "no tests" (33) is not caught.
CAUGHT = frozenset({1, 3, -24, 24, 152, 255, 36})

# Mutants no test can tell from the original (each checked by hand), by mutmut's name. A new
# mutmut version may number them differently: re-check the survivors then.
EQUIVALENT: dict[str, str] = {}


def _meta(module: str) -> dict[str, int | None]:
    path = ROOT / "mutants" / "sidecar" / (module.replace(".", "/") + ".py.meta")
    if not path.exists():
        return {}
    codes: dict[str, int | None] = json.loads(path.read_text())["exit_code_by_key"]
    return codes


def score(module: str) -> tuple[int, int, list[str]]:
    """(caught, counted, not caught) of `module`'s last run; equivalent mutants are not counted."""
    codes = _meta(module)
    counted = {name: code for name, code in codes.items() if name not in EQUIVALENT}
    survivors = sorted(name for name, code in counted.items() if code not in CAUGHT)
    killed = sum(1 for code in counted.values() if code in CAUGHT)
    return killed, len(counted), survivors


def run(module: str, children: int) -> None:
    command = [sys.executable, "-m", "mutmut", "run", f"sidecar.{module}.*", "--max-children", str(children)]
    subprocess.run(["nice", "-n", "19", *command], cwd=ROOT, check=False,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", default=MODULES, help=f"default: {' '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=1, help="mutmut workers (default 1: a shared machine)")
    parser.add_argument("--report-only", action="store_true", help="print the last run's scores, run nothing")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    args = parser.parse_args()
    below = False
    print(f"{'module':<16} {'killed':>7} {'mutants':>8} {'score':>7}")
    for module in args.modules:
        if not args.report_only:
            run(module, args.children)
        killed, counted, survivors = score(module)
        ratio = killed / counted if counted else 0.0
        below |= ratio < TARGET
        print(f"{module:<16} {killed:>7} {counted:>8} {ratio:>7.1%}", flush=True)
        if args.survivors:
            for name in survivors:
                print(f"    survived: {name}")
    equivalent = [name for name in EQUIVALENT if any(name.startswith(f"sidecar.{m}.") for m in args.modules)]
    if equivalent:
        print(f"equivalent mutants not counted: {len(equivalent)} (scripts/mutation.py EQUIVALENT)")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
