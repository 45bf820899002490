"""The README works as written, offline: its quick start and demo run, every EGRESS_* variable is
documented, its references resolve, and its example Deployment gets the sidecar injected."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jsonpatch
import yaml

from sidecar import config as cfg
from sidecar.inject.patch import pod_patch
from sidecar.inject.settings import from_mapping as settings_from_mapping
from tests.conftest import ROOT, free_port
from tests.e2e.k8s_support import documents, find, injector_settings, render, validate
from tests.servers.upstream import wait_until

README = ROOT / "README.md"


def quick_start() -> list[tuple[str, str]]:
    """(command, what its output shows after `# -> `, or "") of the Quick start's first sh block."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.splitlines():
        command, _, comment = line.partition("  #")
        expected = comment.split("->", 1)[1].strip() if "->" in comment else ""
        commands.append((command.strip(), expected))
    return commands


def _make(*targets: str) -> list[str]:
    # The test's own venv; -o: do not reinstall into it from the checkout (it is installed already).
    venv = Path(sys.prefix)
    return ["make", "-C", str(ROOT), f"VENV={venv}", "-o", str(venv / ".installed"),
            "-o", str(venv / ".demo-installed"), *targets]


def _shows(output: str, expected: str) -> bool:
    """Whether `output` shows `expected`: its parts between `...` in order; a leading status
    code is the README's commentary."""
    expected = re.sub(r"^\d{3} ", "", expected)
    position = 0
    for part in (p.strip() for p in expected.split("...")):
        found = output.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


def test_quick_start_commands_and_the_demo_work_offline() -> None:
    commands = quick_start()
    assert [c for c, _ in commands][0] == "make demo" and ("make test", "") in commands
    listen, admin = free_port(), free_port()
    env = {**os.environ, "EGRESS_LISTEN_PORT": str(listen), "EGRESS_ADMIN_PORT": str(admin),
           "EGRESS_ADMIN_HOST": "127.0.0.1", "EGRESS_LOG_FORMAT": "json"}
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy"):
        env.pop(name, None)
    running: subprocess.Popen[bytes] | None = None
    try:
        for command, expected in commands:
            if command == "make test":
                continue  # this test is part of it
            if command == "make demo":
                # --any-port: never the fixed 15001/15090 in a test (other sidecars may run beside it).
                demo = subprocess.run(_make("demo", "DEMO_ARGS=--any-port"), capture_output=True, text=True, timeout=120,
                                      stdin=subprocess.DEVNULL, env=env)
                assert demo.returncode == 0, demo.stdout + demo.stderr
                for shown in ("HTTP/1.1 200", "hello from the local HTTPS upstream", "HTTP/1.1 403",
                              "x-egress-error: denied_ip", '"event":"access"', "demo: stopped"):
                    assert shown in demo.stdout, demo.stdout
                continue
            if command == "make run":
                started = running = subprocess.Popen(_make("run"), env=env, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL, start_new_session=True)
                wait_until(functools.partial(_ready, admin, started), timeout=60, message="make run ready")
                continue
            assert command.startswith(("curl ", "http_proxy=")), command
            # Only through the sidecar, which refuses before connecting: `-x`, or http_proxy aimed at
            # loopback (were the variable ignored, curl would reach 127.0.0.1, never another host).
            assert " -x http://127.0.0.1:15001 " in command or "curl -s http://127.0.0.1:" in command, command
            line = command.replace("15001", str(listen)).replace("15090", str(admin))
            result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30, env=env)
            assert result.returncode == 0 and _shows(result.stdout, expected), (line, expected, result.stdout)
    finally:
        if running is not None and running.poll() is None:
            os.killpg(running.pid, signal.SIGTERM)  # make and the sidecar it started, nothing else
            running.wait(30)


def _ready(admin: int, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"make run exited with {proc.returncode}"
    try:
        return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_every_egress_variable_of_the_code_is_documented() -> None:
    code = "\n".join(p.read_text() for p in (ROOT / "sidecar").rglob("*.py"))
    # The config's overrides, and any other EGRESS_* name the code reads from the environment
    # (not every EGRESS_* string is a variable: the egress lock's iptables chain is EGRESS_OUTPUT).
    read = re.findall(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"'](EGRESS_[A-Z0-9_]+)", code)
    names = set(cfg.ENV_OVERRIDES) | set(read)
    assert {"EGRESS_LISTEN_PORT", "EGRESS_POOL_MAX_CONNECTIONS"} <= names
    readme = README.read_text()
    assert not sorted(n for n in names if f"`{n}`" not in readme)


def test_readme_references_resolve() -> None:
    for path in (README, ROOT / "helm" / "egress-sidecar" / "README.md", ROOT / "bench" / "README.md"):
        text = path.read_text()
        assert "DESIGN.md" not in text and "STYLE.md" not in text, path
        assert not re.search(r"\b[Ii]ssue \d+", text), (path, re.search(r".{40}\b[Ii]ssue \d+.{20}", text))
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if not target.startswith(("http://", "https://")):
                assert (path.parent / target).exists(), (path, target)


def test_example_deployment_opts_in_and_is_injected() -> None:
    values = yaml.safe_load((ROOT / "examples" / "values-shop.yaml").read_text())
    docs = documents(render(values))
    config_maps = [d for d in find(docs, "ConfigMap", "egress-sidecar-config") if d["metadata"]["namespace"] == "shop"]
    assert len(config_maps) == 1
    config = cfg.from_mapping(yaml.safe_load(config_maps[0]["data"]["config.yaml"]))
    assert [(r.name, r.prefix) for r in config.routes] == [("github", "/github")]

    deployment = yaml.safe_load((ROOT / "examples" / "deployment.yaml").read_text())
    validate(deployment)
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": "web-1",
                                                           "namespace": "shop"}, "spec": template["spec"]}
    settings = settings_from_mapping(yaml.safe_load(injector_settings(docs)))
    result = pod_patch(pod, settings, namespace_opted_in=False)
    assert result.reason == "injected", result
    patched = jsonpatch.apply_patch(pod, result.patch)
    validate(patched)
    sidecars = [c["name"] for c in patched["spec"].get("initContainers", []) + patched["spec"]["containers"]]
    assert "egress-sidecar" in sidecars
    env = {e["name"]: e.get("value") for e in patched["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15001"
    assert env["GITHUB_API_URL"] == "http://127.0.0.1:15001/github"
