"""Circuit breaking per upstream (host:port), pure: state transitions over an injectable clock.

closed --N consecutive failures within `window`--> open --`cooldown` passed--> half_open
half_open --the one probe succeeds--> closed;  half_open --the probe fails--> open (cooldown again)

While open, requests fail at once with 503 `circuit_open` (Retry-After: the rest of the
cooldown) instead of piling onto a failing upstream. Half-open lets exactly ONE probe through;
others keep failing fast until the probe's outcome is known. A failure is a connect failure, a
reset or timeout before the response, or a 5xx (Envoy's "consecutive gateway errors"); any other
response is a success and ends the streak. Modelled on Envoy's outlier detection and the
classic Nygard breaker; it breaks per upstream, so routes naming the same upstream share one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from sidecar.config import CircuitBreaker

Clock = Callable[[], float]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# For a gauge: egress_circuit_state{upstream} 0 closed, 1 half-open, 2 open.
STATE_VALUES: dict[str, int] = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

# Error kinds (errors.ERRORS) that count against the upstream. Local conditions (pool_timeout,
# overloaded), policy denials and the app going away say nothing about the upstream's health.
FAILURE_KINDS = frozenset(
    {"connect_error", "connect_timeout", "tls_error", "upstream_reset", "protocol_error",
     "read_timeout", "write_timeout"}
)


def is_failure_status(status: int) -> bool:
    return status >= 500


class Breaker:
    """One upstream's breaker. Call `admit()` before a try, then exactly one of
    `record_success()`, `record_failure()` or `release()` (outcome unknown, e.g. the app left)."""

    __slots__ = (
        "_clock",
        "_cooldown",
        "_failures",
        "_opened_at",
        "_probing",
        "_state",
        "_threshold",
        "_window",
        "config",
        "on_change",
        "upstream",
    )

    def __init__(self, upstream: str, config: CircuitBreaker, clock: Clock = time.monotonic) -> None:
        self.upstream = upstream
        self.config = config
        self._threshold = config.consecutive_failures
        self._window = float(config.window)
        self._cooldown = float(config.cooldown)
        self._clock = clock
        self._failures: deque[float] = deque(maxlen=max(self._threshold, 1))
        self._state = CLOSED
        self._opened_at = 0.0
        self._probing = False
        # Called with (upstream, new_state) on every transition; the log/metrics may hook it.
        self.on_change: Callable[[str, str], None] | None = None

    @property
    def state(self) -> str:
        """The current state; an open breaker whose cooldown passed reads as half_open."""
        if self._state == OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._set(HALF_OPEN)
        return self._state

    def admit(self) -> bool:
        """May a try go to the upstream now? In half-open, True for the one probe only."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def retry_after(self) -> int:
        """Whole seconds until a try may be admitted again (at least 1): the rest of the cooldown."""
        remaining = self._cooldown - (self._clock() - self._opened_at) if self._state == OPEN else 0.0
        return max(1, math.ceil(remaining))

    def record_success(self) -> None:
        self._failures.clear()
        self._probing = False
        if self._state != CLOSED:
            self._set(CLOSED)

    def record_failure(self) -> None:
        now = self._clock()
        if self._state == HALF_OPEN and self._probing:
            self._probing = False
            self._open(now)
            return
        if self._state != CLOSED:
            return  # a try admitted before the breaker opened: it is open already
        self._failures.append(now)
        if len(self._failures) == self._threshold and now - self._failures[0] <= self._window:
            self._open(now)

    def release(self) -> None:
        """The try ended without telling anything about the upstream; free the probe slot."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._set(OPEN)

    def _set(self, state: str) -> None:
        self._state = state
        if self.on_change is not None:
            self.on_change(self.upstream, state)


class Breakers:
    """The breakers of all routes that configure one, keyed by upstream host:port."""

    def __init__(self, clock: Clock = time.monotonic, previous: Breakers | None = None) -> None:
        self._clock = clock
        self._by_upstream: dict[str, Breaker] = {}
        self._previous = previous._by_upstream if previous is not None else {}

    def add(self, upstream: str, config: CircuitBreaker) -> Breaker | None:
        """The breaker for an upstream; routes naming the same upstream share the first one made."""
        if config.consecutive_failures <= 0:
            return None
        breaker = self._by_upstream.get(upstream)
        if breaker is None:
            kept = self._previous.get(upstream)  # a reload: same upstream, same settings, same state
            if kept is not None and kept.config == config:
                breaker = self._by_upstream[upstream] = kept
            else:
                breaker = self._by_upstream[upstream] = Breaker(upstream, config, self._clock)
        return breaker

    def states(self) -> dict[str, str]:
        """upstream (host:port) -> closed | open | half_open, for the metrics collector at scrape time."""
        return {upstream: breaker.state for upstream, breaker in self._by_upstream.items()}
