"""Run tests/sealed/ inside a private network namespace, from any pytest invocation.

Outside the namespace (a plain `pytest`, `make test`, CI) no sealed test body or fixture ever
runs: the first sealed item starts ONE inner pytest under `unshare --net --mount` over the
selected sealed files, and each outer item then replays its inner reports (pass, fail with
the inner traceback, skip with the reason), the way pytest-xdist relays worker reports.
Inside (EGRESS_SEALED_REPORTS set), a session fixture refuses to run unless the namespace is
provably sealed, adds the target addresses to lo and starts the catching listeners; every
test asserts it is still sealed before it sends anything.
Where a namespace cannot be made (not root and no user namespaces, no `unshare`), every
sealed test is skipped with a message naming why.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from _pytest.reports import TestReport

from tests.sealed import netns
from tests.sealed.catchers import Catchers, remember_sni
from tests.sealed.dns import (
    OUTER_MOUNT_NS_ENV,
    DNSServer,
    in_private_mount_namespace,
    mount_namespace,
    use_resolver,
)

SEALED_DIR = Path(__file__).resolve().parent
REPORTS_ENV = "EGRESS_SEALED_REPORTS"
INNER = REPORTS_ENV in os.environ
# Bound on the whole inner run (each test inside also has pytest-timeout's limit).
INNER_TIMEOUT = float(os.environ.get("EGRESS_SEALED_TIMEOUT", "900"))


def _is_sealed_item(item: pytest.Item) -> bool:
    return SEALED_DIR in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_sealed_item(item):
            item.add_marker(pytest.mark.sealed)
            if not INNER:
                # The first outer item runs the whole inner session: pytest-timeout's per-test
                # limit would cut it off; INNER_TIMEOUT bounds it instead (each inner test keeps
                # the per-test limit).
                item.add_marker(pytest.mark.timeout(INNER_TIMEOUT + 30))


# --- outside: run the sealed tests in a namespace and replay their reports ----------------


class _InnerRun:
    """One pytest run of the selected sealed files inside a fresh namespace, and its reports."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.skip_reason: str | None = None
        self.failure: str | None = None
        self.reports: dict[str, list[dict[str, Any]]] = {}

    def run(self, session: pytest.Session) -> None:
        prefix, reason = netns.unshare_prefix()
        if prefix is None:
            self.skip_reason = f"sealed network namespace unavailable: {reason}"
            return
        files = sorted({str(Path(str(i.path)).relative_to(self.config.rootpath)) for i in session.items
                        if _is_sealed_item(i)})
        options = ["-p", "no:cacheprovider", "-q", "-rN", "-o", "addopts="]
        if self.config.option.markexpr:
            options += ["-m", self.config.option.markexpr]
        if self.config.option.keyword:
            options += ["-k", self.config.option.keyword]
        with tempfile.NamedTemporaryFile(prefix="egress-sealed-", suffix=".jsonl", delete=False) as handle:
            report_path = handle.name
        # Its own session, so a run that overstays is stopped with everything it started
        # (sidecars inside the namespace) by killing that one process group.
        inner = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pytest", *options, *files],
            cwd=self.config.rootpath,
            env={**os.environ, REPORTS_ENV: report_path, OUTER_MOUNT_NS_ENV: mount_namespace()},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = inner.communicate(timeout=INNER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(inner.pid, signal.SIGKILL)
            output = f"inner sealed run timed out after {INNER_TIMEOUT}s\n" + inner.communicate()[0]
        try:
            with open(report_path) as lines:
                for line in lines:
                    data = json.loads(line)
                    self.reports.setdefault(data["nodeid"], []).append(data)
        finally:
            os.unlink(report_path)
        self.failure = f"no report from the sealed run; its output:\n{output[-4000:]}"

    def replay(self, item: pytest.Item) -> None:
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        datas = self.reports.get(item.nodeid)
        if datas:
            for data in datas:
                report = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
                ihook.pytest_runtest_logreport(report=report)
        else:
            if self.skip_reason is not None:
                outcome, when = "skipped", "setup"
                longrepr: Any = (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {self.skip_reason}")
            else:
                outcome, when, longrepr = "failed", "call", self.failure
            for phase in ("setup", "call", "teardown"):
                ihook.pytest_runtest_logreport(report=TestReport(
                    item.nodeid, item.location, {}, outcome if phase == when else "passed",
                    longrepr if phase == when else None, phase,
                ))
                if phase == when:
                    break
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


_inner_run: _InnerRun | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    global _inner_run
    if INNER or not _is_sealed_item(item):
        return None
    if _inner_run is None:
        _inner_run = _InnerRun(item.config)
        _inner_run.run(item.session)
    _inner_run.replay(item)
    return True


# --- inside: prove the seal, set up targets and catchers, record reports ------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not INNER:
        return
    config = _config
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    with open(os.environ[REPORTS_ENV], "a") as out:
        out.write(json.dumps(data) + "\n")


_config: Any = None


def pytest_configure(config: pytest.Config) -> None:
    global _config
    _config = config


def assert_sealed() -> None:
    """Fail (never send) unless this process is in a namespace with nothing but loopback."""
    reason = netns.not_sealed_reason()
    if reason is not None:
        pytest.exit(f"refusing to run sealed tests: not in a sealed network namespace ({reason})", returncode=3)


@pytest.fixture(scope="session")
def sealed_network() -> Iterator[None]:
    if not INNER:
        pytest.fail("sealed fixtures must never run outside the namespace")
    assert_sealed()
    netns.add_target_addresses()
    assert_sealed()
    yield


@pytest.fixture(autouse=True)
def _sealed_guard(sealed_network: None) -> None:
    assert_sealed()


@pytest.fixture(scope="session")
def tmp_sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sealed")


# Names the catching TLS listener answers for (the sidecar trusts the test CA).
CATCHER_NAMES = (
    "public.test", "*.public.test", "rebind.test", "public.static.test",
    "1.1.1.1", "8.8.4.4", "2606:4700:4700::1111", "10.0.0.1",  # 10.0.0.1: the allow_cidrs control
    # host-rule tests
    "exact.test", "allowed.test", "*.allowed.test", "*.deep.allowed.test", "other.test", "*.xn--bcher-kva.test",
)


@pytest.fixture(scope="session")
def catchers(sealed_network: None, ca: trustme.CA) -> Iterator[Catchers]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*CATCHER_NAMES).configure_cert(context)
    running = Catchers({80: None, 443: remember_sni(context)})
    yield running
    running.stop()


@pytest.fixture
def caught(catchers: Catchers) -> Catchers:
    """The catchers, cleared for this test."""
    catchers.clear()
    return catchers


# What the sealed DNS server answers (TTL 0). Lists of lists are successive A answers.
DNS_ANSWERS: dict[str, list[list[str]]] = {
    "public.test": [["1.1.1.1"]],
    "rebind.test": [["1.1.1.1"], ["10.0.0.1"]],  # public first, private next: DNS rebinding
    "mixed.test": [["8.8.4.4", "10.0.0.1"]],  # one public and one private address
    "metadata.test": [["169.254.169.254"]],
    "v6-metadata.test": [["fd00:ec2::254"]],
    "mapped.test": [["::ffff:169.254.169.254"]],
    "intranet.test": [["192.168.1.1"]],
}


@pytest.fixture(scope="session")
def system_resolver(sealed_network: None, tmp_sealed: Path) -> None:
    """/etc/resolv.conf -> 127.0.0.1 for this namespace only (private mount namespace)."""
    if not in_private_mount_namespace():
        pytest.skip("not in a private mount namespace: will not touch /etc/resolv.conf")
    use_resolver(tmp_sealed)


@pytest.fixture
def dns(system_resolver: None) -> Iterator[DNSServer]:
    """A fresh DNS server (rebinding counters start over) answering DNS_ANSWERS."""
    server = DNSServer(DNS_ANSWERS)
    yield server
    server.stop()
