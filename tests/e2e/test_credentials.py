"""Credential injection through the real sidecar: the upstream sees the route's secret, the app's
header of the same name is replaced, a rotated Kubernetes Secret is picked up without a restart,
and the secret never appears in logs, `/config` or error bodies."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import ROOT, Sidecar, base_config
from tests.k8s_secret import create_secret_volume, rotate_secret_volume
from tests.upstream import Upstream, wait_until

TOKEN_1 = "tok-1-9f8e7d6c5b4a"
TOKEN_2 = "tok-2-0a1b2c3d4e5f"
LITERAL = "literal-key-31415926"


def secret_sidecar(make_sidecar: Callable[..., Sidecar], upstream: Upstream, volume: Path, **overrides: Any) -> Sidecar:
    return make_sidecar(
        routes=[{
            "name": "api", "prefix": "/api", "upstream": f"https://localhost:{upstream.port}",
            "headers": {
                "Authorization": {"file": str(volume / "token"), "template": "Bearer {}"},
                "X-Api-Key": {"value": LITERAL},
            },
        }],
        **overrides,
    )


def seen_headers(sidecar: Sidecar, headers: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    with httpx.Client(trust_env=False) as client:  # origin-form: a route
        response = client.get(f"{sidecar.url}/api/echo", headers=headers)
    assert response.status_code == 200, response.text
    return [(k.lower(), v) for k, v in json.loads(response.content)["headers"]]


def test_route_injects_the_secret_and_replaces_the_apps_header(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, tmp_path: Path
) -> None:
    volume = tmp_path / "secret"
    create_secret_volume(volume, {"token": TOKEN_1 + "\n"})
    sidecar = secret_sidecar(make_sidecar, upstream, volume)
    headers = seen_headers(sidecar, [("Authorization", "Bearer from-the-app"), ("authorization", "Basic again"),
                                     ("X-Api-Key", "app-key"), ("X-Other", "kept")])
    assert [v for k, v in headers if k == "authorization"] == [f"Bearer {TOKEN_1}"]
    assert [v for k, v in headers if k == "x-api-key"] == [LITERAL]
    assert ("x-other", "kept") in headers


def test_rotated_secret_reaches_the_upstream_without_a_restart(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, tmp_path: Path
) -> None:
    volume = tmp_path / "secret"
    create_secret_volume(volume, {"token": TOKEN_1})
    sidecar = secret_sidecar(make_sidecar, upstream, volume)
    assert ("authorization", f"Bearer {TOKEN_1}") in seen_headers(sidecar)
    rotate_secret_volume(volume, {"token": TOKEN_2})  # the kubelet's ..data symlink swap

    def rotated() -> bool:
        return ("authorization", f"Bearer {TOKEN_2}") in seen_headers(sidecar)

    wait_until(rotated, timeout=10, interval=0.2, message="upstream sees the rotated token")
    assert sidecar.proc.poll() is None  # same process: no restart
    sidecar.wait_log(lambda e: e.get("event") == "secret file changed; new value in use")


def test_secret_never_appears_in_logs_config_or_error_bodies(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream, tmp_path: Path
) -> None:
    volume = tmp_path / "secret"
    create_secret_volume(volume, {"token": TOKEN_1})
    # Debug logging: the most talkative the sidecar gets.
    sidecar = secret_sidecar(make_sidecar, upstream, volume, log={"level": "debug", "format": "json"})
    bodies = []
    with httpx.Client(trust_env=False) as client:  # origin-form: a route
        for path in ("/api/echo", "/api/status/500", "/api/reset", "/api/garbage"):
            bodies.append(client.get(f"{sidecar.url}{path}").content)
    rotate_secret_volume(volume, {"token": TOKEN_2})
    wait_until(lambda: ("authorization", f"Bearer {TOKEN_2}") in seen_headers(sidecar), timeout=10, interval=0.2)
    config_text = httpx.get(f"{sidecar.admin_url}/config").text
    assert str(volume / "token") in config_text  # the path is shown, the content is not
    sidecar.wait_log(lambda e: e.get("kind") == "upstream_reset")
    sidecar.terminate()
    log_text = sidecar.log_path.read_text()
    errors = [b for b in bodies[1:] if b.startswith(b"egress-sidecar:")]
    assert errors, "expected at least one error body from the failing paths"
    for secret in (TOKEN_1, TOKEN_2, LITERAL):
        assert secret not in log_text
        assert secret not in config_text
        assert all(secret.encode() not in body for body in errors)


def test_unreadable_secret_stops_start_up_naming_the_file(ca_file: str, tmp_path: Path) -> None:
    config = base_config(ca_file, routes=[{
        "name": "api", "prefix": "/api", "upstream": "https://localhost:1",
        "headers": {"Authorization": {"file": str(tmp_path / "missing-token")}},
    }])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)],
                            check=False, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert f"cannot read secret file {tmp_path / 'missing-token'}" in result.stderr
