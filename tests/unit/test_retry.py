"""Retry rules: which tries repeat, backoff with full jitter, the budget over a sliding window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.config import Retries, RetryBudget, Seconds
from sidecar.resilience.retry import Budget, RetryPolicy, full_jitter, reason_for_kind
from sidecar.upstream.transport.replay import ReplayableBody


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_idempotent_methods_are_retried_by_default() -> None:
    policy = RetryPolicy(Retries(attempts=2))
    assert [m for m in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "POST", "PATCH") if policy.allows_method(m)] == [
        "GET", "HEAD", "OPTIONS", "PUT", "DELETE"]


def test_a_route_can_opt_post_in() -> None:
    assert RetryPolicy(Retries(attempts=1, methods=["POST"])).allows_method("POST")


def test_zero_attempts_retries_nothing() -> None:
    assert not RetryPolicy(Retries(attempts=0)).allows_method("GET")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("connect_error", "connect"), ("connect_timeout", "connect"), ("upstream_reset", "reset"),
     ("read_timeout", "timeout"), ("write_timeout", "timeout"), ("tls_error", None), ("protocol_error", None),
     ("pool_timeout", None), ("overloaded", None), ("denied_ip", None), ("internal", None)],
)
def test_failure_kinds_map_to_retry_reasons(kind: str, reason: str | None) -> None:
    assert reason_for_kind(kind) == reason


def test_only_configured_reasons_and_statuses_retry() -> None:
    policy = RetryPolicy(Retries(attempts=2, on=["connect", 503]))
    assert policy.reason_for_error("connect_error") == "connect"
    assert policy.reason_for_error("upstream_reset") is None  # reset not listed
    assert policy.reason_for_status(503) == "503"
    assert policy.reason_for_status(502) is None
    assert policy.reason_for_status(200) is None


def test_default_reasons_are_connect_and_reset_not_timeout() -> None:
    policy = RetryPolicy(Retries(attempts=1))
    assert policy.reason_for_error("upstream_reset") == "reset"
    assert policy.reason_for_error("read_timeout") is None


@pytest.mark.parametrize(("attempt", "ceiling"), [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (9, 0.25)])
def test_full_jitter_grows_exponentially_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert full_jitter(attempt, 0.025, 0.25, rng=lambda: 0.0) == 0.0
    assert full_jitter(attempt, 0.025, 0.25, rng=lambda: 0.999999) == pytest.approx(ceiling, rel=1e-5)
    assert full_jitter(attempt, 0.025, 0.25, rng=lambda: 0.5) == pytest.approx(ceiling / 2)


def test_full_jitter_spreads_waits() -> None:
    waits = {round(RetryPolicy(Retries(attempts=1)).backoff(3), 6) for _ in range(50)}
    assert len(waits) > 10
    assert all(0 <= wait < 0.2 for wait in waits)


def test_budget_allows_min_retries_with_no_traffic() -> None:
    budget = Budget(RetryBudget(percent=20, window=Seconds(10), min_retries=3), Clock())
    assert [budget.try_acquire() for _ in range(5)] == [True, True, True, False, False]


def test_budget_caps_retries_at_percent_of_requests_plus_min() -> None:
    budget = Budget(RetryBudget(percent=20, window=Seconds(10), min_retries=3), Clock())
    for _ in range(100):
        budget.record_request()
    granted = sum(budget.try_acquire() for _ in range(100))
    assert granted == 23


def test_budget_window_slides_and_old_traffic_expires() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(percent=10, window=Seconds(10), min_retries=0), clock)
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(20)) == 10
    clock.now += 5  # half the window later: the retries still count
    assert not budget.try_acquire()
    clock.now += 5.5  # the requests and retries left the window
    assert not budget.try_acquire()  # no requests in the window: 10% of 0, min 0
    for _ in range(30):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(10)) == 3


def test_budget_percent_zero_and_min_zero_never_retries() -> None:
    budget = Budget(RetryBudget(percent=0, window=Seconds(10), min_retries=0), Clock())
    for _ in range(1000):
        budget.record_request()
    assert not budget.try_acquire()


async def _source(chunks: list[bytes], pulled: list[int]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        pulled.append(len(chunk))
        yield chunk


async def _collect(body: ReplayableBody, stop_after: int | None = None) -> bytes:
    out = []
    async for chunk in body:
        out.append(chunk)
        if stop_after is not None and len(out) >= stop_after:
            break
    return b"".join(out)


def test_small_body_is_replayed_byte_exact() -> None:
    pulled: list[int] = []
    body = ReplayableBody(_source([b"a" * 10, b"b" * 20], pulled), limit=100)
    assert asyncio.run(_collect(body)) == b"a" * 10 + b"b" * 20
    assert body.replayable
    assert asyncio.run(_collect(body)) == b"a" * 10 + b"b" * 20
    assert pulled == [10, 20]  # the source was read once


def test_body_interrupted_mid_send_replays_kept_part_then_continues() -> None:
    pulled: list[int] = []

    async def scenario() -> tuple[bytes, bytes]:
        body = ReplayableBody(_source([b"1", b"2", b"3"], pulled), limit=100)
        first = await _collect(body, stop_after=1)  # the try failed after one chunk went out
        assert body.replayable
        return first, await _collect(body)

    assert asyncio.run(scenario()) == (b"1", b"123")
    assert pulled == [1, 1, 1]


def test_body_larger_than_limit_is_streamed_and_not_replayable() -> None:
    pulled: list[int] = []
    body = ReplayableBody(_source([b"x" * 40, b"y" * 40], pulled), limit=64)
    assert asyncio.run(_collect(body)) == b"x" * 40 + b"y" * 40  # still sent whole
    assert not body.replayable
    with pytest.raises(RuntimeError):
        asyncio.run(_collect(body))


def test_body_never_pulled_is_replayable_even_with_limit_zero() -> None:
    body = ReplayableBody(_source([b"x" * 100], []), limit=0)
    assert body.replayable  # a connect failure: nothing went out
    assert asyncio.run(_collect(body)) == b"x" * 100
    assert not body.replayable


def test_budget_window_slides_bucket_by_bucket() -> None:
    """Traffic spread over the window leaves it a bucket (window/10) at a time, not all at once."""
    clock = Clock()
    budget = Budget(RetryBudget(percent=10, window=Seconds(10), min_retries=0), clock)
    start = clock.now
    for second in range(10):  # 10 requests in each one-second bucket
        clock.now = start + second
        for _ in range(10):
            budget.record_request()
    clock.now = start + 9.5
    assert sum(budget.try_acquire() for _ in range(20)) == 10  # 10 % of the 100 in the window
    clock.now = start + 14.5  # the first five buckets (50 requests, no retries) left the window
    assert sum(budget.try_acquire() for _ in range(20)) == 0  # 10 retries against 10 % of 50: none
    clock.now = start + 19.5  # everything left: the retries too
    assert not budget.try_acquire()
    budget.record_request()
    assert budget.try_acquire() and not budget.try_acquire()  # room while retries < 10 % of requests


def test_budget_counts_requests_in_the_current_bucket_after_a_wrap() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(percent=50, window=Seconds(1), min_retries=0), clock, buckets=2)
    for _ in range(4):
        budget.record_request()
    clock.now += 1.0  # two buckets later the same ring entry is reused: it starts afresh
    for _ in range(2):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(5)) == 1


def test_budget_has_ten_buckets_per_window() -> None:
    clock = Clock()
    clock.now = 0.95  # bucket 0 of a 10 s window (1 s buckets); with 11 it would be bucket 1
    budget = Budget(RetryBudget(percent=100, window=Seconds(10), min_retries=0), clock)
    budget.record_request()
    clock.now = 10.5  # bucket 0 has left the window
    assert not budget.try_acquire()


def test_budget_window_of_under_a_second_keeps_its_own_length() -> None:
    clock = Clock()
    clock.now = 0.0
    budget = Budget(RetryBudget(percent=100, window=Seconds(0.5), min_retries=0), clock)
    budget.record_request()
    clock.now = 0.55
    assert not budget.try_acquire()


def test_budget_of_a_route_never_used_allows_only_its_minimum() -> None:
    clock = Clock()
    clock.now = 0.0  # early in the clock's life the ring's unused entries lie inside the window
    budget = Budget(RetryBudget(percent=100, window=Seconds(10), min_retries=0), clock)
    assert not budget.try_acquire()


@pytest.mark.parametrize(("percent", "window"), [(100, 10), (50, 20), (25, 3)])
def test_budget_grants_exactly_percent_of_the_requests(percent: int, window: int) -> None:
    budget = Budget(RetryBudget(percent=percent, window=Seconds(window), min_retries=0), Clock())
    for _ in range(100):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(200)) == percent


def test_a_body_of_exactly_the_limit_stays_replayable() -> None:
    body = ReplayableBody(_source([b"x" * 30, b"y" * 34], []), limit=64)
    assert asyncio.run(_collect(body)) == b"x" * 30 + b"y" * 34
    assert body.replayable is True
    over = ReplayableBody(_source([b"x" * 65], []), limit=64)
    asyncio.run(_collect(over))
    assert over.replayable is False
    with pytest.raises(RuntimeError, match="^request body was already streamed and cannot be sent again$"):
        asyncio.run(_collect(over))


def test_policy_keeps_its_config_and_clock() -> None:
    clock = Clock()
    config = Retries(attempts=2, max_body_bytes=123, budget=RetryBudget(percent=0, window=Seconds(10), min_retries=1))
    policy = RetryPolicy(config, clock)
    assert policy.max_body_bytes == 123
    assert policy.budget.try_acquire() and not policy.budget.try_acquire()
    clock.now += 11  # the policy's budget reads the policy's clock
    assert policy.budget.try_acquire()
    assert policy.backoff(2, rng=lambda: 0.5) == pytest.approx(full_jitter(2, policy.backoff_base,
                                                                           policy.backoff_max, lambda: 0.5))


def test_budget_of_a_young_clock_counts_only_what_happened() -> None:
    clock = Clock()
    clock.now = 0.0  # untouched ring entries lie inside the window: they must hold nothing
    budget = Budget(RetryBudget(percent=100, window=Seconds(10), min_retries=0), clock)
    for _ in range(5):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(10)) == 5


def test_budget_percent_is_exact_over_many_requests() -> None:
    budget = Budget(RetryBudget(percent=100, window=Seconds(10), min_retries=0), Clock())
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_acquire() for _ in range(2000)) == 1000


def test_budget_adds_up_retries_across_buckets() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(percent=100, window=Seconds(10), min_retries=0), clock)
    budget.record_request()
    budget.record_request()
    assert budget.try_acquire()
    clock.now += 1  # the next bucket
    assert budget.try_acquire()
    assert not budget.try_acquire()  # two retries (in two buckets) for two requests
