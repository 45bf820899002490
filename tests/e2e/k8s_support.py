"""Helpers for the Kubernetes tests: render the chart, validate objects, run the real injector.

Rendering uses Helm v4's engine as a library (helm-python-sdk), i.e. `helm template` without a
cluster; validation uses the Kubernetes OpenAPI-derived JSON schemas of kubernetes-validate.
"""

from __future__ import annotations

import functools
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import jsonschema
import kubernetes_validate
import yaml
from helm_python import _native as helm_native
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from tests.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "egress-sidecar"
RELEASE, NAMESPACE = "es", "egress"
# The oldest Kubernetes with native sidecars on by default, and the newest schema shipped.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def render(
    values: dict[str, Any] | None = None, chart: Path = CHART, kube_version: str | None = None
) -> dict[str, str]:
    """`helm template` offline; `kube_version` sets .Capabilities.KubeVersion (default: Helm's, 1.36)."""
    with helm.Chart.load(chart) as loaded:
        if kube_version is None:
            return loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        # The library's C ABI takes kube_version for rendering; its Python wrapper (0.2.2) does not
        # pass it on yet, so call the ABI the way Chart.render does.
        options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version}
        rendered = helm_native.call_string(
            "helm_render", loaded._raw(), json.dumps(values or {}), json.dumps(options)
        )
        return dict(json.loads(rendered))


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object of a render (NOTES.txt is text, not a manifest)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def injector_settings(docs: list[dict[str, Any]]) -> str:
    return str(one(docs, "ConfigMap", f"{RELEASE}-egress-sidecar-injector")["data"]["settings.yaml"])


@functools.cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema for one kind, built once: its own `validate` re-reads
    and re-parses the (multi-megabyte) definitions file on every call."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # as kubernetes_validate.utils
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    schema = schema_contents(f"{directory}/{kind.lower()}-{group_version}.json", version)
    definitions = schema_contents(f"{directory}/_definitions.json", version)
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict[str, Any]) -> None:
    """Strict schema validation (unknown fields are errors) for every version in KUBE_VERSIONS."""
    for version in KUBE_VERSIONS:
        error = jsonschema.exceptions.best_match(
            _validator(version, obj["kind"], obj["apiVersion"]).iter_errors(obj)
        )
        if error is not None:
            path = ".".join(str(p) for p in error.absolute_path)
            raise AssertionError(f"{obj['kind']} invalid for Kubernetes {version} at {path}: {error.message}")


class LogReader:
    """Drains a process's stdout on a thread (a full pipe would block the process) and lets a
    test wait, with a deadline, for a JSON log event."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<eof>")
            self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                found.append(event)
        return found

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = next((e for e in self.events() if predicate(e)), None)
                if match is not None:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or "<eof>" in self.lines:
                    raise AssertionError(f"no matching log event; log={self.lines[-20:]}")
                self._changed.wait(remaining)


@dataclass
class Injector:
    process: subprocess.Popen[bytes]
    url: str
    ca: ssl.SSLContext
    log: LogReader

    def post(self, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        with httpx.Client(verify=self.ca, timeout=5) as client:
            return client.post(self.url + path, content=content, headers={"content-type": "application/json"})

    def get(self, path: str) -> httpx.Response:
        with httpx.Client(verify=self.ca, timeout=5) as client:
            return client.get(self.url + path)


@contextmanager
def run_injector(settings_file: Path, cert: Path, key: Path, ca: ssl.SSLContext) -> Iterator[Injector]:
    """Start `python -m sidecar inject` on an ephemeral port; stop it (by PID) afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "inject",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--settings",
            str(settings_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    log = LogReader(process.stdout)
    try:
        # The injector listens before it logs this line, so the first request cannot be refused.
        port = int(log.wait_for(lambda e: e.get("event") == "inject.listening", timeout=15)["port"])
        injector = Injector(process, f"https://127.0.0.1:{port}", ca, log)
        assert injector.get("/healthz").status_code == 200
        yield injector
    finally:
        stop_process(process, 10)
