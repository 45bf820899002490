"""Injector settings: the sidecar container and volume exactly as the Helm chart rendered them.

The chart renders its `egress-sidecar.container` and `egress-sidecar.volume` named templates into
the injector's settings file, so the webhook injects the very spec a static user includes. Values
the webhook must reason about (ports, drain grace) are read back from that spec's environment,
never configured twice.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import Seconds, read_yaml

# Environment variables the rendered container must carry: the sidecar reads them (config.py's
# ENV_OVERRIDES) and the webhook rewrites them for the per-pod port and drain overrides.
LISTEN_PORT_ENV = "EGRESS_LISTEN_PORT"
ADMIN_PORT_ENV = "EGRESS_ADMIN_PORT"
DRAIN_GRACE_ENV = "EGRESS_DRAIN_GRACE"
ADMIN_PORT_NAME = "egress-admin"


class SettingsError(ValueError):
    """The settings file cannot be used; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """What the webhook injects. `container` and `volume` are plain Kubernetes objects."""

    container: dict[str, Any]
    volume: dict[str, Any]
    no_proxy: tuple[str, ...]
    prometheus_annotations: bool
    listen_port: int
    admin_port: int
    drain_grace: float
    pre_stop_seconds: float = 0.0  # a preStop `sleep N` delays SIGTERM (fallback mode)
    # TLS interception on: the CA volume (emptyDir) and the directory it is mounted at.
    ca_volume: dict[str, Any] | None = None
    ca_dir: str | None = None
    # The egress lock's init container (chart: egress-sidecar.lockContainer), and whether pods
    # get it by default (annotation egress-sidecar.io/lock decides per pod).
    lock_container: dict[str, Any] | None = None
    lock_default: bool = False
    transparent_port: int | None = 15006  # listen.transparent_port of the sidecar config
    metadata_identity: bool = False  # the sidecar config chose policy.metadata: identity

    def fresh_lock_container(self) -> dict[str, Any]:
        if self.lock_container is None:
            raise SettingsError("the settings have no `lock.container`: re-render the chart")
        return copy.deepcopy(self.lock_container)

    @property
    def name(self) -> str:
        return str(self.container["name"])

    @property
    def native(self) -> bool:
        """Native sidecar (an init container with restartPolicy Always, Kubernetes >= 1.29)."""
        return self.container.get("restartPolicy") == "Always"

    def fresh_container(self) -> dict[str, Any]:
        """A deep copy the caller may change."""
        return copy.deepcopy(self.container)

    def fresh_volume(self) -> dict[str, Any]:
        return copy.deepcopy(self.volume)

    def fresh_ca_volume(self) -> dict[str, Any] | None:
        return copy.deepcopy(self.ca_volume)


def env_value(container: dict[str, Any], name: str) -> str | None:
    """The literal value of one env var of a container spec, or None."""
    for entry in container.get("env") or []:
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get("value"), str):
            return str(entry["value"])
    return None


def _port(container: dict[str, Any], env: str) -> int:
    text = env_value(container, env)
    if text is None or not text.isdigit() or not 0 < int(text) < 65536:
        raise SettingsError(f"container.env {env} must be a port number as a string, got {text!r}")
    return int(text)


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    """N of a rendered `preStop: exec: [sleep, N]` hook, else 0."""
    hook = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
    command = hook.get("command") or []
    if len(command) == 2 and command[0] == "sleep" and str(command[1]).isdigit():
        return float(command[1])
    return 0.0


def from_mapping(raw: object) -> Settings:
    """Validate the settings mapping the chart rendered."""
    if not isinstance(raw, dict):
        raise SettingsError("settings must be a mapping with `container` and `volume`")
    container, volume = raw.get("container"), raw.get("volume")
    if not isinstance(container, dict) or not isinstance(container.get("name"), str):
        raise SettingsError("`container` must be a container spec with a name")
    if not isinstance(container.get("image"), str) or not container["image"]:
        raise SettingsError("`container.image` must be set")
    if not isinstance(volume, dict) or not isinstance(volume.get("configMap"), dict):
        raise SettingsError("`volume` must be a configMap volume")
    if not any(
        isinstance(p, dict) and p.get("name") == ADMIN_PORT_NAME for p in container.get("ports") or []
    ):
        raise SettingsError(f"`container.ports` must name the admin port {ADMIN_PORT_NAME!r}")
    grace_text = env_value(container, DRAIN_GRACE_ENV)
    try:
        grace = Seconds.parse(grace_text)
    except ValueError as exc:
        raise SettingsError(f"container.env {DRAIN_GRACE_ENV}: {exc}") from None
    no_proxy = raw.get("noProxy", [])
    if not isinstance(no_proxy, list) or not all(isinstance(x, str) for x in no_proxy):
        raise SettingsError("`noProxy` must be a list of strings")
    scrape = raw.get("prometheusAnnotations", True)
    if not isinstance(scrape, bool):
        raise SettingsError("`prometheusAnnotations` must be true or false")
    intercept = raw.get("intercept")
    ca_volume: dict[str, Any] | None = None
    ca_dir: str | None = None
    if intercept is not None:
        if not isinstance(intercept, dict):
            raise SettingsError("`intercept` must be a mapping with `caDir` and `volume`")
        ca_dir, ca_volume = intercept.get("caDir"), intercept.get("volume")
        if not isinstance(ca_dir, str) or not ca_dir.startswith("/"):
            raise SettingsError("`intercept.caDir` must be an absolute path")
        if not isinstance(ca_volume, dict) or not isinstance(ca_volume.get("name"), str):
            raise SettingsError("`intercept.volume` must be a volume with a name")
    lock = raw.get("lock", {})
    if not isinstance(lock, dict) or not isinstance(lock.get("enabled", False), bool):
        raise SettingsError("`lock` must be a mapping with `enabled` (true or false) and `container`")
    lock_container = lock.get("container")
    if lock_container is not None and not (isinstance(lock_container, dict) and lock_container.get("name")):
        raise SettingsError("`lock.container` must be a container spec with a name")
    transparent = lock.get("transparentPort", 15006)
    if transparent is not None and (isinstance(transparent, bool) or not isinstance(transparent, (int, float))
                                    or not 0 <= transparent < 65536):
        raise SettingsError("`lock.transparentPort` must be a port number or null")
    identity = raw.get("metadataIdentity", False)
    if not isinstance(identity, bool):
        raise SettingsError("`metadataIdentity` must be true or false")
    return Settings(
        container=container,
        volume=volume,
        no_proxy=tuple(no_proxy),
        prometheus_annotations=scrape,
        listen_port=_port(container, LISTEN_PORT_ENV),
        admin_port=_port(container, ADMIN_PORT_ENV),
        drain_grace=float(grace),
        pre_stop_seconds=_pre_stop_seconds(container),
        ca_volume=ca_volume,
        ca_dir=ca_dir,
        lock_container=lock_container,
        lock_default=bool(lock.get("enabled", False)),
        transparent_port=int(transparent) if transparent is not None else None,
        metadata_identity=identity,
    )


def load(path: str | Path) -> Settings:
    """Read and validate a settings YAML file."""
    return from_mapping(read_yaml(path, "settings file", SettingsError))
