"""Config: embedded defaults, YAML overrides, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar import config as cfg


def test_embedded_default_file_matches_the_built_in_defaults() -> None:
    assert cfg.from_mapping(yaml.safe_load(cfg.embedded_default_text())) == cfg.Config()


def test_yaml_file_overrides_and_merges(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("timeouts: {connect: 250ms}\npool: {max_connections: 8, max_keepalive_connections: 8}\n")
    config = cfg.load(path, environ={})
    assert float(config.timeouts.connect) == 0.25
    assert float(config.timeouts.read) == 30.0  # untouched keys keep their default
    assert config.pool.max_connections == 8


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: {port: 1111}\nlog: {level: debug}\n")
    config = cfg.load(path, environ={"EGRESS_LISTEN_PORT": "2222", "EGRESS_DRAIN_GRACE": "3s"})
    assert config.listen.port == 2222
    assert float(config.drain.grace) == 3.0
    assert config.log.level == "debug"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"pool": {"max_connections": "many"}}, "$.pool.max_connections"),
        ({"timeouts": {"connect": "5 parsecs"}}, "$.timeouts.connect"),
        ({"timeouts": {"read": "-1s"}}, "$.timeouts.read"),
        ({"log": {"level": "loud"}}, "$.log.level"),
        ({"listen": {"host": "0.0.0.0"}}, "$.listen.host"),
        ({"pool": {"max_connections": 10, "max_keepalive_connections": 5}}, "$.pool.max_keepalive_connections"),
        ({"policy": {"allow_cidrs": ["10.0.0.0/33"]}}, "$.policy.allow_cidrs[0]"),
        ({"routes": [{"name": "a", "prefix": "a", "upstream": "https://x"}]}, "$.routes[0].prefix"),
        ({"routes": [{"name": "a", "prefix": "/a", "upstream": "ftp://x"}]}, "$.routes[0].upstream"),
        ({"routes": [{"name": "a", "prefix": "/a", "upstream": "https://x"},
                     {"name": "a", "prefix": "/b", "upstream": "https://y"}]}, "$.routes[1].name"),
        ({"routes": [{"name": "a", "prefix": "/a", "upstream": "https://x", "headers": {"X": {}}}]},
         "$.routes[0].headers.X"),
        ({"resolve": {"a.test": "not-an-ip"}}, "$.resolve.a.test"),
        ({"admin": {"port": 15001}}, "$.admin.port"),
        ({"policy": {"connect_ports": [443, 70000]}}, "$.policy.connect_ports[1]"),
        ({"policy": {"connect_ports": "443"}}, "$.policy.connect_ports"),
        ({"timeouts": {"tunnel_idle": "0s"}}, "$.timeouts.tunnel_idle"),
        ({"limits": {"max_tunnels": -1}}, "$.limits.max_tunnels"),
    ],
)
def test_bad_values_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(cfg.ConfigError) as error:
        cfg.from_mapping(raw)
    assert key in str(error.value)


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(cfg.ConfigError, match="poool"):
        cfg.from_mapping({"poool": {}})


def test_non_loopback_listen_needs_explicit_opt_in() -> None:
    config = cfg.from_mapping({"listen": {"host": "0.0.0.0", "allow_non_loopback": True}})
    assert config.listen.host == "0.0.0.0"


@pytest.mark.parametrize(("text", "seconds"), [("5s", 5.0), ("250ms", 0.25), ("1m", 60.0), ("1.5s", 1.5), (2, 2.0)])
def test_durations(text: object, seconds: float) -> None:
    assert float(cfg.Seconds.parse(text)) == seconds


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load(tmp_path / "missing.yaml", environ={})
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(cfg.ConfigError, match="mapping"):
        cfg.load(path, environ={})
    path.write_text("a: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid YAML"):
        cfg.load(path, environ={})


@pytest.mark.parametrize("key", ["max_connections", "max_keepalive_connections"])
def test_either_pool_limit_written_alone_sets_both(key: str) -> None:
    pool = cfg.from_mapping({"pool": {key: 10}}).pool
    assert (pool.max_connections, pool.max_keepalive_connections) == (10, 10)


def test_pool_max_connections_from_the_environment_over_the_default_file(tmp_path: Path) -> None:
    path = tmp_path / "default.yaml"
    path.write_text(cfg.embedded_default_text())
    pool = cfg.load(path, environ={"EGRESS_POOL_MAX_CONNECTIONS": "10"}).pool
    assert (pool.max_connections, pool.max_keepalive_connections) == (10, 10)


def test_environment_value_that_is_not_yaml_names_the_variable() -> None:
    with pytest.raises(cfg.ConfigError, match="EGRESS_LOG_LEVEL .*line 1"):
        cfg.load(None, environ={"EGRESS_LOG_LEVEL": "[debug"})


def _routes(*routes: tuple[str, str]) -> dict:
    return {"routes": [{"name": f"r{i}", "prefix": prefix, "upstream": upstream}
                       for i, (prefix, upstream) in enumerate(routes)]}


@pytest.mark.parametrize("second", ["/api", "/api/", "/api//"])
def test_duplicate_route_prefixes_are_refused(second: str) -> None:
    with pytest.raises(cfg.ConfigError, match=r"\$\.routes\[1\]\.prefix.*") as error:
        cfg.from_mapping(_routes(("/api", "https://a.test"), (second, "https://b.test")))
    assert "routes[0]" in str(error.value) and "never apply" in str(error.value)


def test_nested_prefixes_are_not_duplicates() -> None:
    config = cfg.from_mapping(_routes(("/api", "https://a.test"), ("/api/v2", "https://b.test")))
    assert [route.prefix for route in config.routes] == ["/api", "/api/v2"]


@pytest.mark.parametrize("upstream", ["https://a.test/base?x=1", "https://a.test?x=1", "https://a.test/#frag"])
def test_upstream_with_a_query_string_says_so(upstream: str) -> None:
    with pytest.raises(cfg.ConfigError, match=r"query string.*\$\.routes\[0\]\.upstream"):
        cfg.from_mapping(_routes(("/a", upstream)))


@pytest.mark.parametrize(
    ("allow", "deny"),
    [
        (["api.example.com"], ["api.example.com"]),
        (["api.example.com"], ["*.example.com"]),
        (["*.a.example.com"], ["*.example.com"]),
        (["*.example.com"], ["*.example.com"]),
        (["Bücher.example."], ["xn--bcher-kva.example"]),
        (["anything.test"], ["*"]),
    ],
)
def test_an_allowed_host_the_deny_list_covers_is_refused(allow: list[str], deny: list[str]) -> None:
    with pytest.raises(cfg.ConfigError, match=r"never apply.*\$\.policy\.allow_hosts\[0\]"):
        cfg.from_mapping({"policy": {"allow_hosts": allow, "deny_hosts": deny}})


@pytest.mark.parametrize(
    ("allow", "deny"),
    [
        (["example.com"], ["*.example.com"]),  # the apex is not under its wildcard
        (["*.example.com"], ["api.example.com"]),  # other subdomains still allowed
        (["*.example.com"], ["*.a.example.com"]),
        (["api.example.org"], ["*.example.com"]),
    ],
)
def test_allow_and_deny_that_overlap_only_in_part_are_fine(allow: list[str], deny: list[str]) -> None:
    cfg.from_mapping({"policy": {"allow_hosts": allow, "deny_hosts": deny}})
