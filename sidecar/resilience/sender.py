"""Sending one request with the route's resilience rules: circuit breaker, retries, budget.

forward.py calls `ResilientSender.send` where it would call `upstream.send`; the sender is handed
the route plans, the upstream's `send` and the observer's `retried` when the runtime is built.
The rules themselves are pure objects (retry.py, breaker.py, shedding.py); this module only
sequences them around the tries. A route with neither retries nor a breaker (and the
forward-proxy form, which has no route) goes straight to `upstream.send`: no cost on that path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import httpx

from sidecar.config import Config
from sidecar.errors import EgressError, classify
from sidecar.observe import log as log_module
from sidecar.policy.hostnames import endpoint
from sidecar.proxy.routing import CompiledRoute
from sidecar.resilience.breaker import CLOSED, FAILURE_KINDS, OPEN, Breaker, Breakers, is_failure_status
from sidecar.resilience.retry import Clock, RetryPolicy
from sidecar.resilience.shedding import Shedding
from sidecar.upstream.transport.replay import ReplayableBody

# upstream.send: one try, the response body not read.
Send = Callable[[httpx.Request, CompiledRoute | None], Awaitable[httpx.Response]]
# observer.retried(route, reason): a try failed and is retried.
Retried = Callable[[str, str], None]

# A response that will be retried has its body read (up to this much, for this long) so its
# connection goes back to the pool instead of being closed; past either, it is closed.
_DISCARD_BYTES = 65536
_DISCARD_SECONDS = 1.0


class RoutePlan:
    """A route's retry policy and breaker, built once at start."""

    __slots__ = ("breaker", "retry", "route")

    def __init__(self, route: str, retry: RetryPolicy | None, breaker: Breaker | None) -> None:
        self.route = route
        self.retry = retry
        self.breaker = breaker


class Resilience:
    """Everything stateful about resilience: plans per route, breakers per upstream, in-flight gates."""

    def __init__(self, config: Config, routes: Sequence[CompiledRoute], clock: Clock = time.monotonic,
                 previous: Resilience | None = None) -> None:
        self.log = log_module.get("egress.resilience")
        # After a reload, a breaker whose upstream and settings did not change keeps its state,
        # and the in-flight gates carry on: a reload neither closes an open circuit nor resets a cap.
        self.breakers: Breakers = Breakers(clock, previous.breakers if previous is not None else None)
        self.shedding: Shedding = Shedding(config.limits.max_in_flight, [(r.name, r.config.max_in_flight) for r in routes],
                                 previous.shedding if previous is not None else None)
        self.plans: dict[str, RoutePlan] = {}
        for route in routes:
            retries, breaker_config = route.config.retries, route.config.circuit_breaker
            retry = RetryPolicy(retries, clock) if retries is not None and retries.attempts > 0 else None
            breaker = (
                self.breakers.add(endpoint(route.host, route.port), breaker_config) if breaker_config is not None else None
            )
            if breaker is not None:
                breaker.on_change = self._breaker_changed
            if retry is not None or breaker is not None:
                self.plans[route.name] = RoutePlan(route.name, retry, breaker)

    def _breaker_changed(self, upstream: str, state: str) -> None:
        # One line per transition (not per refused request: those are counted as circuit_open).
        log = self.log.warning if state == OPEN else self.log.info
        log("circuit_state", upstream=upstream, state=state)


class ResilientSender:
    """Sends requests upstream under their route's breaker and retry rules (built once at start)."""

    __slots__ = ("_plans", "_retried", "_send")

    def __init__(self, plans: Mapping[str, RoutePlan], send: Send, retried: Retried) -> None:
        self._plans = plans
        self._send = send
        self._retried = retried

    async def send(
        self,
        request: httpx.Request,
        route: CompiledRoute | None,
        on_attempt: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """Send `request` upstream under the route's breaker and retry rules; the body is not read.

        `on_attempt` is called right before each try goes to the pool (timings restart per try).
        """
        plan = self._plans.get(route.name) if route is not None else None
        if plan is None:
            if on_attempt is not None:
                on_attempt()
            return await self._send(request, route)
        policy, breaker = plan.retry, plan.breaker
        body: ReplayableBody | None = None
        if policy is not None:
            policy.budget.record_request()  # every request on the route grows the budget, retryable or not
            if policy.allows_method(request.method):
                body = _keep_body(request, policy.max_body_bytes)
            else:
                policy = None
        attempt = 0
        while True:
            if breaker is not None and not breaker.admit():
                raise EgressError("circuit_open", f"upstream {breaker.upstream}", retry_after=breaker.retry_after())
            if on_attempt is not None:
                on_attempt()
            try:
                response = await self._send(request, route)
            except Exception as exc:
                kind = classify(exc)
                if breaker is not None:
                    if kind in FAILURE_KINDS:
                        breaker.record_failure()
                    else:
                        breaker.release()
                reason = policy.reason_for_error(kind) if policy is not None else None
                if reason is None or not _may_retry(policy, attempt, body, breaker):
                    raise
            except BaseException:  # cancelled (the app left, or the drain ended): no verdict on the upstream
                if breaker is not None:
                    breaker.release()
                raise
            else:
                if breaker is not None:
                    if is_failure_status(response.status_code):
                        breaker.record_failure()
                    else:
                        breaker.record_success()
                reason = policy.reason_for_status(response.status_code) if policy is not None else None
                if reason is None or not _may_retry(policy, attempt, body, breaker):
                    return response
                await _discard(response)
            assert policy is not None and route is not None
            self._retried(route.name, reason)
            await asyncio.sleep(policy.backoff(attempt))
            attempt += 1


def _keep_body(request: httpx.Request, limit: int) -> ReplayableBody | None:
    """Make a streamed body replayable (kept up to `limit` bytes); None when it needs nothing."""
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):
        return None  # bytes in memory (an empty body): replayable as they are
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        limit = 0  # known to be too large: keep nothing (still retryable if no byte went out)
    body = ReplayableBody(stream, limit)  # type: ignore[arg-type]
    request.stream = body
    return body


def _may_retry(policy: RetryPolicy | None, attempt: int, body: ReplayableBody | None, breaker: Breaker | None) -> bool:
    """Another try is allowed: attempts left, the body can be sent again, the breaker is closed,
    and the budget has room (asked last: asking takes a retry from it)."""
    return (
        policy is not None
        and attempt < policy.attempts
        and (body is None or body.replayable)
        and (breaker is None or breaker.state == CLOSED)
        and policy.budget.try_acquire()
    )


async def _discard(response: httpx.Response) -> None:
    stream = response.stream
    try:
        async with asyncio.timeout(_DISCARD_SECONDS):
            read = 0
            async for chunk in stream:  # type: ignore[union-attr]
                read += len(chunk)
                if read > _DISCARD_BYTES:
                    break
    except (httpx.HTTPError, TimeoutError, OSError):
        pass  # the connection is closed below instead of reused
    finally:
        await stream.aclose()  # type: ignore[union-attr]
