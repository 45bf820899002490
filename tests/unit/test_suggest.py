"""suggest-policy's pure parts: merging inventories, collapsing names, the rendered block."""

from __future__ import annotations

import yaml

from sidecar import config as cfg
from sidecar.policy.suggest import collapse, merge, registrable_domain, render

IS_PUBLIC = registrable_domain()


def entry(host: str, via: str = "forward-proxy", requests: int = 1, **extra: object) -> dict[str, object]:
    return {"host": host, "port": 443, "via": via, "route": None, "requests": requests, **extra}


def test_merge_sums_over_sources_and_leaves_routes_out() -> None:
    seen, notes = merge([
        ("a", {"destinations": [entry("API.example.com."), entry("up.example", "route", 9),
                                entry("new.example", would_deny_reasons={"not_allowed": 2}, requests=2,
                                      first_seen="2026-01-02T00:00:00.000Z", last_seen="2026-01-03T00:00:00.000Z")]}),
        ("b", {"destinations": [entry("api.example.com", "tunnel", 3), entry("10.0.0.1", denied=4, requests=4),
                                entry("new.example", would_deny_reasons={"not_allowed": 1},
                                      first_seen="2026-01-01T00:00:00.000Z", last_seen="2026-01-02T00:00:00.000Z")]}),
    ])
    assert set(seen) == {"api.example.com", "new.example", "10.0.0.1"} and notes == []
    api = seen["api.example.com"]
    assert (api.requests, api.via, api.tunnel_ports, api.sources) == (4, {"forward-proxy", "tunnel"}, {443},
                                                                       {"a", "b"})
    new = seen["new.example"]
    assert (new.would_deny, new.first_seen, new.last_seen) == ({"not_allowed": 3}, "2026-01-01T00:00:00.000Z",
                                                               "2026-01-03T00:00:00.000Z")
    assert (seen["10.0.0.1"].requests, seen["10.0.0.1"].denied) == (0, 4)


def test_collapse_takes_the_deepest_shared_parent_and_never_a_public_suffix() -> None:
    names = ["svc.example.com", "a.svc.example.com", "b.svc.example.com", "c.svc.example.com", "x.example.com",
             "one.github.io", "two.github.io", "three.github.io", "b1.s3.amazonaws.com", "b2.s3.amazonaws.com",
             "b3.s3.amazonaws.com", "foo.com", "bar.com", "baz.com", "1.1.1.1", "1.1.1.2", "1.1.1.3"]
    patterns = collapse(names, 3, IS_PUBLIC)
    assert patterns["*.svc.example.com"] == ["a.svc.example.com", "b.svc.example.com", "c.svc.example.com"]
    assert "x.example.com" in patterns  # 2 left under example.com after svc took its 3
    assert "svc.example.com" in patterns  # *.svc.example.com does not cover the apex
    for public in ("*.github.io", "*.s3.amazonaws.com", "*.com", "*.amazonaws.com", "*.1.1"):
        assert public not in patterns
    assert {"one.github.io", "b1.s3.amazonaws.com", "foo.com", "1.1.1.1"} <= set(patterns)
    assert all(len(v) == 1 for v in collapse(names, 0, IS_PUBLIC).values())


def test_rendered_block_is_a_valid_config_with_comments() -> None:
    seen, _ = merge([("a", {"destinations": [
        entry("a.svc.example.com"), entry("b.svc.example.com", would_deny_reasons={"not_allowed": 1}),
        entry("db.example.net", "tunnel", port=5432), entry("169.254.169.254", denied=1)]})])
    text = render(seen, 2, IS_PUBLIC, ["a"])
    block = yaml.safe_load(text)
    assert block["policy"]["allow_hosts"] == ["db.example.net", "*.svc.example.com"]
    assert block["policy"]["connect_ports"] == [5432]
    assert (block["policy"]["mode"], block["policy"]["default"]) == ("enforce", "deny")
    cfg.from_mapping(block)  # what check-config runs
    assert "WOULD-DENY not_allowed x1" in text and "# not allowed: 169.254.169.254" in text
    assert "collapsed: a.svc.example.com, b.svc.example.com" in text
