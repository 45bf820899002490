"""The bench report's HTTP/2 goals (issue 18): the HTTP/2 route against the HTTP/1.1 route."""

from __future__ import annotations

from typing import Any

from bench.report import h2_goals


def result(name: str, rps: tuple[float, float], cpu: tuple[float, float], conns: int) -> dict[str, Any]:
    return {"name": name, "ok": True, "upstream": {"connections": conns},
            "load": {"32": {"rps": rps[0], "cpu_us_per_req": cpu[0]},
                     "256": {"rps": rps[1], "cpu_us_per_req": cpu[1]}}}


def test_h2_goals_compare_the_two_routes_of_one_run() -> None:
    goals = h2_goals([result("sidecar", (1000, 1000), (200, 200), 100),
                      result("sidecar-h2", (900, 700), (250, 270), 2)])
    assert [(goal, met) for goal, met, _ in goals] == [
        ("CPU per request <= 1.3x HTTP/1.1 at c32", True), ("CPU per request <= 1.3x HTTP/1.1 at c256", False),
        ("req/s >= 0.8x HTTP/1.1 at c32", True), ("req/s >= 0.8x HTTP/1.1 at c256", False),
        ("upstream TLS connections <= 2 for the whole run", True)]
    assert goals[0][2] == "1.25x (250 vs 200 µs)"


def test_without_both_routes_there_are_no_h2_goals() -> None:
    assert h2_goals([result("sidecar", (1, 1), (1, 1), 1)]) == []
