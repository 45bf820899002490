"""`make mutation`: mutation testing of the pure modules with only the unit tests, one module at a time.

mutmut (configured in pyproject.toml [tool.mutmut]) changes one thing at a time in a function
body (an operator, a constant, a condition) and runs the unit tests that cover it: a mutant
the tests do not notice (survived) is behaviour nothing pins. This runs each module in turn
(mutmut is CPU-heavy; `nice -n 19`, one worker by default) and prints the score per module:
killed (a test failed, or the mutant hung past its timeout) over all mutants, less the
equivalent mutants listed in EQUIVALENT (no test can tell them apart from the original).

    python scripts/mutation.py [MODULE ...] [--children N] [--fresh] [--report-only] [--survivors]

mutmut keeps each mutant's verdict while its function is unchanged, even when the tests change:
`--fresh` (what `make mutation` uses) starts from nothing, so new tests count.

Exit status 1 if a module scores below TARGET.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "policy.addresses", "policy.hostnames", "proxy.headers", "proxy.routing", "resilience.retry",
    "resilience.breaker", "errors", "upstream.transport.wire", "upstream.transport.replay",
)
TARGET = 0.90
# Exit codes mutmut records for a mutant the tests caught: a test failed (1, or 3: pytest's
# internal error), or it ran past its timeout (SIGXCPU). "no tests" (33) is not caught.
CAUGHT = frozenset({1, 3, -24, 24, 152, 255, 36})

# Mutants no test can tell from the original (each checked by hand), by mutmut's name. A new
# mutmut version may number them differently: re-check the survivors then.
_C = "\u01c1"  # mutmut's separator between a class and its method in a mutant's name
EQUIVALENT: dict[str, str] = {
    # addresses
    "sidecar.policy.addresses.x__parse_v4__mutmut_5": "len(parts) >= 1: parse_ip_literal refuses an empty host first",
    "sidecar.policy.addresses.x__parse_v6__mutmut_5": "split without maxsplit: [0] is the same",
    "sidecar.policy.addresses.x__parse_v6__mutmut_8": "maxsplit 2: [0] is the same",
    "sidecar.policy.addresses.x__v4_part__mutmut_5": "the '0X' spelling: parse_ip_literal lower-cases first",
    "sidecar.policy.addresses.x__v4_part__mutmut_6": "the '0X' spelling: parse_ip_literal lower-cases first",
    "sidecar.policy.addresses.x__v4_part__mutmut_18": "'0' read in base 8 is 0 as in base 10",
    "sidecar.policy.addresses.x__v4_part__mutmut_31": "int(text) is int(text, 10)",
    "sidecar.policy.addresses.x_parse_network__mutmut_2": "strict=None is falsy like strict=False",
    # headers: which headers the Connection tokens are computed for (a shortcut, same result)
    "sidecar.proxy.headers.x_upstream_request_headers__mutmut_5": "tokens always computed: empty without Connection",
    "sidecar.proxy.headers.x_upstream_request_headers__mutmut_9": "tokens skipped only when nothing but Connection",
    "sidecar.proxy.headers.x_upstream_request_headers__mutmut_16": "length_sent None is falsy like False",
    # hostnames
    "sidecar.policy.hostnames.x_canonical_host__mutmut_15": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.policy.hostnames.x{_C}HostPatterns{_C}__init____mutmut_3": "match_all None is falsy like False",
    f"sidecar.policy.hostnames.x{_C}HostPatterns{_C}matches__mutmut_21": "a canonical name has no empty label",
    # breaker
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}__init____mutmut_15": "maxlen 2 with threshold 1: the length test is the same",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}__init____mutmut_17": "_opened_at is read only once opened",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}__init____mutmut_18": "_opened_at is read only once opened",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}__init____mutmut_19": "_probing None is falsy like False",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}record_failure__mutmut_2": "_probing is True only while half-open",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}record_failure__mutmut_4": "_probing None is falsy like False",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}record_success__mutmut_1": "_probing None is falsy like False",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}release__mutmut_1": "_probing None is falsy like False",
    f"sidecar.resilience.breaker.x{_C}Breaker{_C}retry_after__mutmut_7": "max(1, ceil(1.0)) is 1",
    # errors
    "sidecar.errors.x_error_head__mutmut_14": "'ASCII' and 'ascii' name the same codec",
    # transport.wire
    "sidecar.upstream.transport.wire.x_may_salvage__mutmut_24": "any negative length means none was given",
    "sidecar.upstream.transport.wire.x_may_salvage__mutmut_25": "chunked None is falsy like False",
    "sidecar.upstream.transport.wire.x_method_bytes__mutmut_1": "the table only caches method.encode()",
    "sidecar.upstream.transport.wire.x_method_bytes__mutmut_2": "the table only caches method.encode()",
    "sidecar.upstream.transport.wire.x_method_bytes__mutmut_3": "the table only caches method.encode()",
    "sidecar.upstream.transport.wire.x_method_bytes__mutmut_8": "'ASCII' and 'ascii' name the same codec",
    # routing
    "sidecar.proxy.routing.x_normalise_host__mutmut_21": "'IDNA' and 'idna' name the same codec",
    "sidecar.proxy.routing.x_normalise_host__mutmut_23": "'ASCII' and 'ascii' name the same codec",
    "sidecar.proxy.routing.x_normalise_host__mutmut_35": "the host is lower-cased: no X to strip",
    "sidecar.proxy.routing.x_split_authority__mutmut_7": "the authority starts with '[': ']' is never at 0",
    "sidecar.proxy.routing.x_split_authority__mutmut_8": "the authority starts with '[': ']' is never at 0",
    "sidecar.proxy.routing.x_split_authority__mutmut_27": "''[1:] is ''",
    "sidecar.proxy.routing.x_compile_route__mutmut_17": "no slash: ('/' + '').rstrip('/') is ''",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_44": "both schemes fit in 8 bytes",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_66": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_71": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}__init____mutmut_28": "hosts are lower-cased: no X to strip",
    f"sidecar.proxy.routing.x{_C}Router{_C}_forward_target__mutmut_60": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}_route_target__mutmut_11": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_13": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_41": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_100": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_136": "'ASCII' and 'ascii' name the same codec",
    f"sidecar.proxy.routing.x{_C}Router{_C}resolve__mutmut_139": "'ASCII' and 'ascii' name the same codec",
    # retry
    f"sidecar.upstream.transport.replay.x{_C}ReplayableBody{_C}__aiter____mutmut_9": "an exhausted async generator stops again",
    f"sidecar.upstream.transport.replay.x{_C}ReplayableBody{_C}__aiter____mutmut_10": "an exhausted async generator stops again",
    f"sidecar.upstream.transport.replay.x{_C}ReplayableBody{_C}__aiter____mutmut_16": "the kept chunks are never read once dropped",
    f"sidecar.upstream.transport.replay.x{_C}ReplayableBody{_C}__init____mutmut_7": "_done None is falsy like False",
    f"sidecar.resilience.retry.x{_C}Budget{_C}__init____mutmut_23": "an untouched ring entry holds zero counts",
    f"sidecar.resilience.retry.x{_C}Budget{_C}__init____mutmut_24": "an untouched ring entry holds zero counts",
}


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
    parser.add_argument("--fresh", action="store_true", help="forget earlier verdicts (mutants/) first")
    args = parser.parse_args()
    if args.fresh and not args.report_only:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
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
