"""Start-up stays cheap: what `egress-sidecar run` imports, and the TLS contexts built ahead of use.

Timings live in bench/startup.py; these tests pin what made them short, so a stray top-level
import (the webhook, PyYAML, httpcore and HTTP/2, importlib.metadata) shows up as a failure.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest

import sidecar
from sidecar import config as cfg
from sidecar.observe.metrics import Metrics
from sidecar.policy import egress as policy
from sidecar.runtime import build_runtime
from sidecar.upstream.tls import TLSContexts, pools

# Modules the `run` path of a config without HTTP/2 routes never needs before it is ready.
NOT_AT_START = [
    "sidecar.inject",  # the webhook: `egress-sidecar inject` only
    "yaml",  # parsed only when a config file or an EGRESS_* variable is given
    "httpcore", "h2", "h11", "hpack", "hyperframe", "anyio",  # httpx's stock transport: HTTP/2 pools only
    "importlib.metadata", "importlib.resources",  # versions come from the packages' own attributes
    "certifi",  # loaded by the TLS thread at run time, not by importing
    "cryptography",  # the interception CA (sidecar/intercept/ca.py): only when interception is configured
    "sidecar.policy.suggest", "publicsuffixlist",  # suggest-policy only
]


def test_importing_the_run_path_leaves_unneeded_modules_unloaded() -> None:
    code = ("import json, sys, sidecar.cli, sidecar.server; "
            f"print(json.dumps([m for m in {NOT_AT_START!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_httpcore_loads_only_when_an_http2_pool_takes_its_first_request(ca_file: str) -> None:
    code = (
        "import asyncio, json, sys, httpx\n"
        "from sidecar import config\n"
        "from sidecar.runtime import build_runtime\n"
        f"runtime = build_runtime(config.from_mapping({{'routes': ["
        f"{{'name': 'a', 'prefix': '/a', 'upstream': 'https://a.test', 'tls': {{'ca_file': {ca_file!r}}}}}, "
        f"{{'name': 'h2', 'prefix': '/h2', 'upstream': 'https://b.test', 'http2': True}}]}}))\n"
        "seen = [[m for m in ('httpcore', 'h2') if m in sys.modules]]\n"
        "print(json.dumps(seen + [runtime.upstream.pool_stats()['h2']]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == [[], [0, 0]]


def routes_config(ca_file: str) -> cfg.Config:
    return cfg.from_mapping({"routes": [
        {"name": "shared", "prefix": "/shared", "upstream": "https://a.test"},  # the default pool
        {"name": "own-ca", "prefix": "/own", "upstream": "https://b.test", "tls": {"ca_file": ca_file}},
        {"name": "own-ca-too", "prefix": "/too", "upstream": "https://c.test", "tls": {"ca_file": ca_file}},
        {"name": "h2", "prefix": "/h2", "upstream": "https://d.test", "http2": True},
    ]})


def test_pools_lists_every_pool_the_upstream_builds(ca_file: str) -> None:
    config = routes_config(ca_file)
    runtime = build_runtime(config)
    assert len(pools(config)) == len(runtime.upstream.transports()) == 4
    assert pools(config)[0] == (config.tls, False)
    assert pools(config)[3] == (config.tls, True)


def test_contexts_built_ahead_are_one_per_pool_with_the_configured_trust(ca_file: str) -> None:
    config = routes_config(ca_file)
    contexts = TLSContexts.start(config)
    own_ca = config.routes[1].tls
    assert own_ca is not None
    first, second = contexts.get(own_ca, False), contexts.get(own_ca, False)
    third = contexts.get(own_ca, False)  # none left ahead: built now, the same way
    assert len({id(first), id(second), id(third)}) == 3
    for context in (first, second, third):
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        assert context.cert_store_stats()["x509_ca"] == 1  # the route's CA, not the system bundle
    system = contexts.get(config.tls, False)
    assert system.cert_store_stats()["x509_ca"] > 10  # certifi's bundle


def test_a_context_that_cannot_be_built_fails_where_the_pool_is_built(tmp_path: Path) -> None:
    config = cfg.from_mapping({"tls": {"ca_file": f"{tmp_path}/missing.pem"}})
    contexts = TLSContexts.start(config)
    with pytest.raises(FileNotFoundError):
        contexts.get(config.tls, False)
    with pytest.raises(FileNotFoundError):
        build_runtime(config, contexts=TLSContexts.start(config))


def test_build_info_versions_agree_with_the_installed_metadata() -> None:
    metrics = Metrics(cfg.Config(), lambda: 0.0)
    labels = {"version": metadata.version("egress-sidecar"), "httpx": metadata.version("httpx")}
    assert sidecar.__version__ == labels["version"] and httpx.__version__ == labels["httpx"]
    sample = metrics.registry.get_sample_value("egress_build_info", {
        **labels, "python": sys.version.split()[0], "implementation": sys.implementation.name})
    assert sample == 1.0


def test_interface_addresses_come_from_the_process_own_libc() -> None:
    # dlopen(NULL): no `ldconfig -p` run at start; the interfaces are still read (getifaddrs).
    assert policy._libc()._name is None
    assert ipaddress.ip_address("127.0.0.1") in policy._interface_addresses()
