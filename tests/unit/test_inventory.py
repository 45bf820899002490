"""The egress inventory: counts per destination, the bound and its eviction, the JSON shape."""

from __future__ import annotations

from sidecar.observe.inventory import Inventory
from sidecar.observe.observer import Exchange


def exchange(upstream: str, route: str = "-", method: str = "GET", status: int = 200, end: float = 1.0,
             **fields: object) -> Exchange:
    return Exchange(start=end - 0.01, method=method, path="/", route=route, upstream=upstream, status=status,
                    end=end, **fields)  # type: ignore[arg-type]


def test_counts_per_destination_and_way_in() -> None:
    inventory = Inventory(10)
    inventory.record(exchange("api.example.com:443", bytes_in=10, bytes_out=100))
    inventory.record(exchange("api.example.com:443", method="POST", status=503, bytes_in=5))
    inventory.record(exchange("api.example.com:443", route="gh", method="BREW", status=418))
    inventory.record(exchange("blocked.example:443", status=403, kind="denied_host", reason="host_denied"))
    inventory.record(exchange("new.example:443", would_deny="not_allowed"))
    inventory.record(exchange("-", status=404, kind="no_route"))  # no destination: not recorded
    inventory.record_tunnel("db.example:5432", bytes_sent=7, bytes_received=9)
    inventory.record_tunnel("other.example:443", status=403, denied="not_allowed")
    shown = {(d["host"], d["port"], d["via"], d["route"]): d for d in inventory.snapshot()["destinations"]}
    assert set(shown) == {
        ("api.example.com", 443, "forward-proxy", None), ("api.example.com", 443, "route", "gh"),
        ("blocked.example", 443, "forward-proxy", None), ("new.example", 443, "forward-proxy", None),
        ("db.example", 5432, "tunnel", None), ("other.example", 443, "tunnel", None),
    }
    api = shown[("api.example.com", 443, "forward-proxy", None)]
    assert (api["requests"], api["methods"], api["status"]) == (2, {"GET": 1, "POST": 1}, {"2xx": 1, "5xx": 1})
    assert (api["bytes_sent"], api["bytes_received"], api["denied"], api["would_deny"]) == (15, 100, 0, 0)
    assert shown[("api.example.com", 443, "route", "gh")]["methods"] == {"OTHER": 1}
    blocked = shown[("blocked.example", 443, "forward-proxy", None)]
    assert (blocked["denied"], blocked["denied_reasons"]) == (1, {"host_denied": 1})
    new = shown[("new.example", 443, "forward-proxy", None)]
    assert (new["would_deny"], new["would_deny_reasons"], new["status"]) == (1, {"not_allowed": 1}, {"2xx": 1})
    tunnel = shown[("db.example", 5432, "tunnel", None)]
    assert (tunnel["requests"], tunnel["methods"], tunnel["bytes_sent"], tunnel["bytes_received"]) == (
        1, {"CONNECT": 1}, 7, 9)
    assert shown[("other.example", 443, "tunnel", None)]["denied_reasons"] == {"not_allowed": 1}


def test_the_least_recently_seen_goes_first_and_is_counted() -> None:
    inventory = Inventory(2)
    inventory.record(exchange("a.example:443", end=1.0))
    inventory.record(exchange("b.example:443", end=2.0))
    inventory.record(exchange("a.example:443", end=3.0))  # a is now the most recent
    inventory.record(exchange("c.example:443", end=4.0))  # evicts b
    snapshot = inventory.snapshot()
    assert [d["host"] for d in snapshot["destinations"]] == ["c.example", "a.example"]
    assert (snapshot["evicted"], snapshot["entries"], snapshot["max_entries"]) == (1, 2, 2)
    inventory.resize(1)
    assert [d["host"] for d in inventory.snapshot()["destinations"]] == ["c.example"]
    assert inventory.evicted == 2


def test_first_and_last_seen_are_wall_clock_times_in_order() -> None:
    inventory = Inventory(5)
    inventory.record(exchange("a.example:443", end=100.0))
    inventory.record(exchange("a.example:443", end=160.5))
    [entry] = inventory.snapshot()["destinations"]
    assert entry["first_seen"] < entry["last_seen"]
    assert entry["first_seen"].endswith("Z") and "T" in entry["first_seen"]


def test_an_ipv6_destination_keeps_its_host_whole() -> None:
    inventory = Inventory(5)
    inventory.record(exchange("2001:db8::1:8443"))
    [entry] = inventory.snapshot()["destinations"]
    assert (entry["host"], entry["port"]) == ("2001:db8::1", 8443)
