"""Retry rules, pure: which tries may be repeated, how long to wait, and the budget that caps them.

Nothing here does I/O. `RetryPolicy` is built once per route from config; the orchestration
(sidecar/resilience/sender.py) asks it questions per try. The rules follow Linkerd and Envoy:
- only methods the route lists (idempotent ones by default, RFC 9110 section 9.2.2),
- only failures before the response started (connect failure, reset before headers, optionally
  a timeout) and statuses the route lists; a response whose head was relayed is never retried,
- backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): a random
  wait in [0, min(max, base * 2**n)], so retries of many clients spread out instead of aligning,
- a budget: retries may add at most `percent` % of the route's requests in a sliding window,
  plus `min_retries` so a quiet route can still retry, and an outage is not multiplied.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from sidecar.config import Retries, RetryBudget

Clock = Callable[[], float]

# Error kinds (errors.ERRORS) that count as each configurable retry reason. Others are never
# retried: a TLS or protocol error repeats on the next try, pool_timeout/overloaded are local
# capacity (a retry would add load), and a policy denial is final.
REASON_KINDS: dict[str, frozenset[str]] = {
    "connect": frozenset({"connect_error", "connect_timeout"}),
    "reset": frozenset({"upstream_reset"}),
    "timeout": frozenset({"read_timeout", "write_timeout"}),
}
_KIND_REASON: dict[str, str] = {kind: reason for reason, kinds in REASON_KINDS.items() for kind in kinds}


def reason_for_kind(kind: str) -> str | None:
    """The retry reason an error kind falls under, or None if such a failure is never retried."""
    return _KIND_REASON.get(kind)


def full_jitter(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry): uniform in [0, ceiling)."""
    ceiling = min(cap, base * (2.0**attempt))
    return ceiling * rng()


class Budget:
    """Retries allowed over a sliding window: at most `min_retries + percent/100 * requests`.

    The window is kept as a ring of `buckets` slots so recording is O(1) and memory does not grow
    with the request rate; the window slides one slot at a time (window/buckets granularity).
    """

    __slots__ = ("_buckets", "_clock", "_epochs", "_min", "_ratio", "_requests", "_retries", "_slot")

    def __init__(self, config: RetryBudget, clock: Clock = time.monotonic, buckets: int = 10) -> None:
        self._ratio = config.percent / 100.0
        self._min = config.min_retries
        self._slot = max(float(config.window), 1e-3) / buckets
        self._buckets = buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._epochs = [-1] * buckets  # which slot number each ring entry currently counts
        self._clock = clock

    def _index(self) -> int:
        epoch = int(self._clock() / self._slot)
        index = epoch % self._buckets
        if self._epochs[index] != epoch:  # the entry holds an expired slot: start it afresh
            self._epochs[index] = epoch
            self._requests[index] = 0
            self._retries[index] = 0
        return index

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock() / self._slot) - self._buckets + 1
        requests = retries = 0
        for index in range(self._buckets):
            if self._epochs[index] >= oldest:
                requests += self._requests[index]
                retries += self._retries[index]
        return requests, retries

    def record_request(self) -> None:
        """A first try of a request on the route (every request counts, retried or not)."""
        self._requests[self._index()] += 1

    def try_acquire(self) -> bool:
        """Take one retry from the budget if there is room; False means: do not retry."""
        requests, retries = self._totals()
        if retries >= self._min + self._ratio * requests:
            return False
        self._retries[self._index()] += 1
        return True


class RetryPolicy:
    """One route's retry rules, built once from its `retries` config."""

    __slots__ = (
        "attempts",
        "backoff_base",
        "backoff_max",
        "budget",
        "max_body_bytes",
        "methods",
        "reasons",
        "statuses",
    )

    def __init__(self, config: Retries, clock: Clock = time.monotonic) -> None:
        self.attempts = config.attempts
        self.methods = frozenset(method.upper() for method in config.methods)
        self.reasons = frozenset(reason for reason in config.on if isinstance(reason, str))
        self.statuses = frozenset(reason for reason in config.on if isinstance(reason, int))
        self.backoff_base = float(config.backoff_base)
        self.backoff_max = float(config.backoff_max)
        self.max_body_bytes = config.max_body_bytes
        self.budget = Budget(config.budget, clock)

    def allows_method(self, method: str) -> bool:
        return self.attempts > 0 and method in self.methods

    def reason_for_error(self, kind: str) -> str | None:
        """The reason label if a failure of this kind (before any response) may be retried."""
        reason = _KIND_REASON.get(kind)
        return reason if reason in self.reasons else None

    def reason_for_status(self, status: int) -> str | None:
        """The reason label if a response with this status may be retried."""
        return str(status) if status in self.statuses else None

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return full_jitter(attempt, self.backoff_base, self.backoff_max, rng)
