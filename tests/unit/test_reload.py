"""Reload's pure parts: which settings need a restart, what is watched, what changed; log level."""

from __future__ import annotations

import io

from sidecar import config as cfg
from sidecar.observe import log as log_module
from sidecar.reload import changed_sections, restart_only, watched_files


def test_listeners_metrics_and_log_format_are_kept_and_named() -> None:
    old = cfg.from_mapping({"listen": {"port": 15001}, "log": {"format": "json"}})
    new = cfg.from_mapping({"listen": {"port": 16001}, "admin": {"port": 16090}, "log": {"format": "console",
                            "level": "debug"}, "metrics": {"max_upstreams": 5}, "policy": {"default": "deny"}})
    applied, kept = restart_only(old, new)
    assert kept == ["listen", "admin", "metrics", "log.format"]
    assert (applied.listen, applied.admin, applied.metrics) == (old.listen, old.admin, old.metrics)
    assert (applied.log.format, applied.log.level, applied.policy.default) == ("json", "debug", "deny")
    assert restart_only(old, old) == (old, [])


def test_certificate_files_of_every_pool_are_watched_once() -> None:
    config = cfg.from_mapping({"tls": {"ca_file": "/a.pem"}, "routes": [
        {"name": "x", "prefix": "/x", "upstream": "https://x.test", "tls": {"ca_file": "/a.pem",
                                                                            "cert_file": "/c.pem", "key_file": "/k.pem"}},
        {"name": "y", "prefix": "/y", "upstream": "https://y.test"}]})
    assert watched_files(config) == ["/a.pem", "/c.pem", "/k.pem"]


def test_changed_sections_names_top_level_keys() -> None:
    old = cfg.from_mapping({})
    new = cfg.from_mapping({"policy": {"mode": "report"}, "inventory": {"max_entries": 5}})
    assert changed_sections(old, new) == ["policy", "inventory"]


def test_set_level_reaches_loggers_already_cached() -> None:
    stream = io.BytesIO()
    log_module.configure(cfg.Log(format="json", level="info"), stream=stream)
    logger = log_module.get("egress.test")
    logger.info("first")  # cached on first use at level info
    log_module.set_level("warning")
    logger.info("second")
    log_module.set_level("debug")
    logger.debug("third")
    log_module.flush()
    events = stream.getvalue().decode()
    assert '"first"' in events and '"second"' not in events and '"third"' in events
    log_module.configure(cfg.Log(format="json"))
