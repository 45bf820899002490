"""`python -m sidecar.inject.waitready`: block until the sidecar's /readyz answers 200.

The fallback (pre-1.29) injection runs this as the sidecar's postStart hook: the kubelet starts
the next container only when the hook returns, so the app starts with the proxy ready.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.inject.waitready", description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("EGRESS_ADMIN_PORT", "15090")))
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    url = f"http://127.0.0.1:{args.port}/readyz"
    deadline = time.monotonic() + args.timeout
    while not ready(url):
        if time.monotonic() >= deadline:
            print(f"egress-sidecar: {url} not ready after {args.timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.1)  # a poll interval in the pod, not test synchronisation
    return 0


if __name__ == "__main__":
    sys.exit(main())
