"""Circuit breaker transitions over an injected clock."""

from __future__ import annotations

import pytest

from sidecar.config import CircuitBreaker, Seconds
from sidecar.resilience.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, Breakers, is_failure_status


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, failures: int = 3, window: float = 10, cooldown: float = 5) -> Breaker:
    return Breaker("api:443", CircuitBreaker(consecutive_failures=failures, window=Seconds(window),
                                             cooldown=Seconds(cooldown)), clock)


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        assert breaker.admit()
        breaker.record_failure()


def test_opens_after_n_consecutive_failures() -> None:
    breaker = make(Clock())
    fail(breaker, 2)
    assert breaker.state == CLOSED
    fail(breaker, 1)
    assert breaker.state == OPEN
    assert not breaker.admit()


def test_a_success_resets_the_streak() -> None:
    breaker = make(Clock())
    fail(breaker, 2)
    assert breaker.admit()
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state == CLOSED


def test_failures_spread_wider_than_the_window_do_not_open() -> None:
    clock = Clock()
    breaker = make(clock, window=10)
    for _ in range(6):
        fail(breaker, 1)
        clock.now += 6  # every 3 consecutive failures span 12s > 10s
    assert breaker.state == CLOSED
    fail(breaker, 1)
    clock.now += 1
    fail(breaker, 1)  # the last three: 6s + 1s apart, within the window
    assert breaker.state == OPEN


def test_open_reports_remaining_cooldown_as_retry_after() -> None:
    clock = Clock()
    breaker = make(clock, cooldown=5)
    fail(breaker, 3)
    assert breaker.retry_after() == 5
    clock.now += 3.2
    assert breaker.retry_after() == 2
    clock.now += 1.7
    assert breaker.retry_after() == 1


def test_half_open_after_cooldown_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    breaker = make(clock, cooldown=5)
    fail(breaker, 3)
    clock.now += 5
    assert breaker.state == HALF_OPEN
    assert breaker.admit()
    assert not breaker.admit()
    assert not breaker.admit()
    assert breaker.retry_after() == 1


def test_probe_success_closes() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 5
    assert breaker.admit()
    breaker.record_success()
    assert breaker.state == CLOSED
    assert breaker.admit() and breaker.admit()


def test_probe_failure_opens_again_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = make(clock, cooldown=5)
    fail(breaker, 3)
    clock.now += 6
    assert breaker.admit()
    breaker.record_failure()
    assert breaker.state == OPEN
    assert breaker.retry_after() == 5
    clock.now += 4.9
    assert not breaker.admit()
    clock.now += 0.1
    assert breaker.admit()


def test_released_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    clock.now += 5
    assert breaker.admit()
    breaker.release()  # the app went away: nothing learned about the upstream
    assert breaker.state == HALF_OPEN
    assert breaker.admit()


def test_late_failure_of_a_try_admitted_before_opening_changes_nothing() -> None:
    clock = Clock()
    breaker = make(clock)
    fail(breaker, 3)
    breaker.record_failure()
    clock.now += 5
    assert breaker.state == HALF_OPEN


def test_transitions_are_reported() -> None:
    clock = Clock()
    breaker = make(clock)
    seen: list[tuple[str, str]] = []
    breaker.on_change = lambda upstream, state: seen.append((upstream, state))
    fail(breaker, 3)
    clock.now += 5
    assert breaker.admit()
    breaker.record_success()
    assert seen == [("api:443", OPEN), ("api:443", HALF_OPEN), ("api:443", CLOSED)]


def test_registry_shares_one_breaker_per_upstream_and_exports_states() -> None:
    clock = Clock()
    breakers = Breakers(clock)
    config = CircuitBreaker(consecutive_failures=1)
    first = breakers.add("a:443", config)
    assert first is not None and breakers.add("a:443", config) is first
    assert breakers.add("b:443", CircuitBreaker(consecutive_failures=0)) is None  # 0: off
    breakers.add("c:8443", config)
    assert first.admit()
    first.record_failure()
    assert breakers.states() == {"a:443": OPEN, "c:8443": CLOSED}


def test_5xx_is_a_failure_4xx_is_not() -> None:
    assert is_failure_status(500) and is_failure_status(503)
    assert not is_failure_status(404) and not is_failure_status(429) and not is_failure_status(200)


# Error kinds that count against an upstream: every row of FAILURE_KINDS, and the others not.
COUNTED = {"connect_error", "connect_timeout", "tls_error", "upstream_reset", "protocol_error",
           "read_timeout", "write_timeout"}


def test_failure_kinds_are_exactly_the_upstreams_faults() -> None:
    from sidecar.errors import ERRORS
    from sidecar.resilience.breaker import FAILURE_KINDS

    assert FAILURE_KINDS == COUNTED
    # local capacity, policy, the app and the sidecar itself say nothing about the upstream
    assert {"pool_timeout", "overloaded", "circuit_open", "denied_host", "denied_ip", "client_timeout",
            "draining", "internal"} <= set(ERRORS) - FAILURE_KINDS


@pytest.mark.parametrize(("status", "failure"), [(200, False), (404, False), (499, False), (500, True),
                                                 (502, True), (599, True)])
def test_failure_status_boundary(status: int, failure: bool) -> None:
    assert is_failure_status(status) is failure


def test_a_breaker_that_opened_after_a_success_admits_its_half_open_probe() -> None:
    clock = Clock()
    breaker = make(clock)
    assert breaker.admit()
    breaker.record_success()
    fail(breaker, 3)
    assert breaker.state == OPEN
    clock.now += 5
    assert breaker.state == HALF_OPEN
    assert breaker.admit() and not breaker.admit()


def test_the_window_is_inclusive_and_the_cooldown_exact() -> None:
    clock = Clock()
    breaker = make(clock, failures=2, window=10, cooldown=5)
    fail(breaker, 1)
    clock.now += 10  # exactly the window apart: still within it
    fail(breaker, 1)
    assert breaker.state == OPEN
    assert breaker.retry_after() == 5
    clock.now += 4.5
    assert breaker.retry_after() == 1 and breaker.state == OPEN
    clock.now += 0.5
    assert breaker.state == HALF_OPEN and breaker.retry_after() == 1


def test_a_breaker_with_no_failure_count_is_none() -> None:
    breakers = Breakers(Clock())
    assert breakers.add("api:443", CircuitBreaker(consecutive_failures=0)) is None
    assert breakers.states() == {}


def test_the_registrys_breakers_read_its_clock_and_know_their_upstream() -> None:
    clock = Clock()
    breakers = Breakers(clock)
    breaker = breakers.add("api:443", CircuitBreaker(consecutive_failures=1, window=Seconds(10),
                                                     cooldown=Seconds(5)))
    assert breaker is not None and breaker.upstream == "api:443"
    fail(breaker, 1)
    assert breakers.states() == {"api:443": OPEN}
    clock.now += 5
    assert breakers.states() == {"api:443": HALF_OPEN}


def test_a_closed_breaker_asks_for_one_second_at_most() -> None:
    clock = Clock()
    clock.now = 1.0  # early in the clock's life: a cooldown computed from 0 would still be running
    assert make(clock).retry_after() == 1


def test_a_reload_keeps_a_breaker_whose_upstream_and_settings_did_not_change() -> None:
    clock = Clock()
    settings = CircuitBreaker(consecutive_failures=1, window=Seconds(10), cooldown=Seconds(5))
    before = Breakers(clock)
    kept = before.add("api:443", settings)
    changed = before.add("other:443", settings)
    assert kept is not None and changed is not None and kept.config == settings
    fail(kept, 1)
    after = Breakers(clock, previous=before)
    assert after.add("api:443", settings) is kept and after.states() == {"api:443": OPEN}
    stricter = CircuitBreaker(consecutive_failures=2, window=Seconds(10), cooldown=Seconds(5))
    assert after.add("other:443", stricter) is not changed
    assert Breakers(clock).add("api:443", settings) is not kept  # no previous: a fresh one
