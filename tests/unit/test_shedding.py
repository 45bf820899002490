"""Load shedding gates: global and per-route in-flight caps."""

from __future__ import annotations

import pytest

from sidecar.errors import EgressError
from sidecar.resilience.shedding import Shedding


def test_route_cap_refuses_at_once_with_overloaded() -> None:
    shedding = Shedding(100, [("a", 2), ("b", None)])
    gate = shedding.gate("a")
    gate.enter()
    gate.enter()
    with pytest.raises(EgressError) as info:
        gate.enter()
    assert info.value.kind == "overloaded"
    assert shedding.in_flight() == {"*": 2, "a": 2, "b": 0}
    gate.leave()
    gate.enter()  # room again


def test_global_cap_covers_all_routes_and_the_forward_proxy_form() -> None:
    shedding = Shedding(3, [("a", None), ("b", 10)])
    shedding.gate("a").enter()
    shedding.gate("b").enter()
    shedding.gate(None).enter()
    for route in ("a", "b", None):
        with pytest.raises(EgressError):
            shedding.gate(route).enter()
    shedding.gate("a").leave()
    shedding.gate("b").enter()
    assert shedding.in_flight() == {"*": 3, "a": 0, "b": 2}


def test_refused_request_is_not_counted() -> None:
    shedding = Shedding(1, [("a", 1)])
    shedding.gate("a").enter()
    with pytest.raises(EgressError):
        shedding.gate("a").enter()
    shedding.gate("a").leave()
    assert shedding.in_flight() == {"*": 0, "a": 0}


def test_no_route_limit_means_only_the_global_cap() -> None:
    shedding = Shedding(1000, [("a", None)])
    gate = shedding.gate("a")
    for _ in range(1000):
        gate.enter()
    with pytest.raises(EgressError):
        gate.enter()
