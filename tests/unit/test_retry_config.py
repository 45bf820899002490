"""Config rules for retries, circuit breakers and in-flight limits: errors name the key."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import config as cfg


def route(**extra: Any) -> dict[str, Any]:
    return {"routes": [{"name": "r", "prefix": "/r", "upstream": "https://api.example.com", **extra}]}


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (route(retries={"on": ["connect", 200]}), "$.routes[0].retries.on"),
        (route(retries={"on": ["sometimes"]}), "$.routes[0].retries.on"),
        (route(retries={"attempts": -1}), "$.routes[0].retries.attempts"),
        (route(retries={"max_body_bytes": -5}), "$.routes[0].retries.max_body_bytes"),
        (route(retries={"budget": {"percent": -1}}), "$.routes[0].retries.budget.percent"),
        (route(retries={"budget": {"window": "0s"}}), "$.routes[0].retries.budget.window"),
        (route(retries={"methods": ["get"]}), "$.routes[0].retries.methods"),
        (route(circuit_breaker={"consecutive_failures": -1}), "$.routes[0].circuit_breaker.consecutive_failures"),
        (route(circuit_breaker={"window": "0s"}), "$.routes[0].circuit_breaker.window"),
        (route(max_in_flight=0), "$.routes[0].max_in_flight"),
        ({"limits": {"max_in_flight": 0}}, "$.limits.max_in_flight"),
    ],
)
def test_invalid_resilience_settings_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(cfg.ConfigError, match=key.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
        cfg.from_mapping(raw)


def test_valid_resilience_settings_load() -> None:
    config = cfg.from_mapping(route(
        retries={"attempts": 2, "on": ["connect", "reset", "timeout", 502, 503], "methods": ["GET", "POST"],
                 "budget": {"percent": 10, "window": "30s", "min_retries": 5}},
        circuit_breaker={"consecutive_failures": 5, "window": "10s", "cooldown": "5s"},
        http2=True, max_in_flight=50,
    ))
    r = config.routes[0]
    assert r.retries is not None and r.retries.on == ["connect", "reset", "timeout", 502, 503]
    assert r.circuit_breaker is not None and r.circuit_breaker.consecutive_failures == 5
    assert r.max_in_flight == 50 and r.http2 is True
