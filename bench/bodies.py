"""The bodies the upstream serves (kept apart so the hello-world peer imports nothing else)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MIB = 1024 * 1024
SMALL_BODY = b"egress-sidecar-bench:" + b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"!" * 7
assert len(SMALL_BODY) == 100


def write_body(path: Path, size: int) -> str:
    """Write `size` random bytes (a random 1 MiB block repeated: quick to make, and a reordering
    within a block still changes the hash) and return their sha256."""
    block = os.urandom(min(size, MIB))
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            out.write(piece)
            digest.update(piece)
            left -= len(piece)
    path.chmod(0o644)
    return digest.hexdigest()
