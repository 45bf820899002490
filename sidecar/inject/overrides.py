"""Per-pod annotations: opt-in/out and overrides of the injected sidecar, parsed and validated.

Every annotation lives under `egress-sidecar.io/`. A bad value is an `InjectError` naming the
annotation, so the pod is refused with a message the user can act on instead of starting
with a sidecar they did not ask for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import Seconds

PREFIX = "egress-sidecar.io/"
INJECT_LABEL = PREFIX + "inject"  # pod or namespace label: "true" opts in, "false" (pod) opts out
INJECTED_LABEL = PREFIX + "injected"  # set on injected pods; the PodMonitor selects it
STATUS_ANNOTATION = PREFIX + "status"  # "injected": the idempotency marker

IMAGE = PREFIX + "image"
CPU_REQUEST = PREFIX + "cpu-request"
CPU_LIMIT = PREFIX + "cpu-limit"
MEMORY_REQUEST = PREFIX + "memory-request"
MEMORY_LIMIT = PREFIX + "memory-limit"
CONFIG_MAP = PREFIX + "config-map"
LISTEN_PORT = PREFIX + "listen-port"
ADMIN_PORT = PREFIX + "admin-port"
DRAIN_GRACE = PREFIX + "drain-grace"
SET_PROXY_ENV = PREFIX + "set-proxy-env"
SET_HTTPS_PROXY = PREFIX + "set-https-proxy"  # "false": with set-proxy-env, HTTP_PROXY only
NO_PROXY = PREFIX + "no-proxy"
SET_TRUST_ENV = PREFIX + "set-trust-env"  # "false": no TLS trust variables for the interception CA
LOCK = PREFIX + "lock"  # "true" | "false": the egress lock's init container (default: the chart's)

_RESOURCES = {
    CPU_REQUEST: ("requests", "cpu"),
    CPU_LIMIT: ("limits", "cpu"),
    MEMORY_REQUEST: ("requests", "memory"),
    MEMORY_LIMIT: ("limits", "memory"),
}
KNOWN = frozenset(
    {
        STATUS_ANNOTATION,
        IMAGE,
        CONFIG_MAP,
        LISTEN_PORT,
        ADMIN_PORT,
        DRAIN_GRACE,
        SET_PROXY_ENV,
        SET_HTTPS_PROXY,
        NO_PROXY,
        SET_TRUST_ENV,
        LOCK,
        *_RESOURCES,
    }
)

# apimachinery's resource.Quantity grammar (k8s.io/apimachinery/pkg/api/resource/quantity.go).
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
# A ConfigMap name is a DNS-1123 subdomain.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NO_PROXY_ENTRY = re.compile(r"^[^\s,]+$")


class InjectError(ValueError):
    """The pod asked for injection but cannot be injected as asked; the message says why."""


@dataclass(frozen=True)
class Overrides:
    image: str | None = None
    resources: tuple[tuple[str, str, str], ...] = ()  # (requests|limits, cpu|memory, quantity)
    config_map: str | None = None
    listen_port: int | None = None
    admin_port: int | None = None
    drain_grace: str | None = None  # kept as written: the sidecar parses the same syntax
    drain_grace_seconds: float | None = None
    set_proxy_env: bool = False
    set_https_proxy: bool = True  # HTTPS_PROXY beside HTTP_PROXY (CONNECT tunnels)
    no_proxy: tuple[str, ...] = ()
    set_trust_env: bool = True  # only matters when interception is on
    lock: bool | None = None  # None: the chart's sidecar.lock.install.enabled
    unknown: tuple[str, ...] = ()  # our-prefix annotations we do not know: warned, not refused


def _bad(key: str, value: str, expected: str) -> InjectError:
    return InjectError(f"annotation {key}: {value!r} is not {expected}")


def _port(key: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise _bad(key, value, "a port number 1-65535")
    return int(value)


def _bool(key: str, value: str) -> bool:
    if value not in ("true", "false"):
        raise _bad(key, value, '"true" or "false"')
    return value == "true"


def parse(annotations: Mapping[str, object]) -> Overrides:
    """Read our annotations from a pod; raise InjectError on the first bad value."""
    ours = {k: v for k, v in annotations.items() if isinstance(k, str) and k.startswith(PREFIX)}
    for key, value in ours.items():
        if not isinstance(value, str):
            raise InjectError(f"annotation {key} must be a string")
    values: dict[str, str] = {k: str(v) for k, v in ours.items()}
    image = values.get(IMAGE)
    if image is not None and (not image or any(c.isspace() for c in image)):
        raise _bad(IMAGE, image, "an image reference")
    resources = []
    for key, (section, resource) in _RESOURCES.items():
        if key in values:
            if not _QUANTITY.match(values[key]):
                raise _bad(key, values[key], "a Kubernetes quantity such as 100m or 128Mi")
            resources.append((section, resource, values[key]))
    config_map = values.get(CONFIG_MAP)
    if config_map is not None and (len(config_map) > 253 or not _DNS_SUBDOMAIN.match(config_map)):
        raise _bad(CONFIG_MAP, config_map, "a ConfigMap name")
    grace_seconds = None
    if DRAIN_GRACE in values:
        try:
            grace_seconds = float(Seconds.parse(values[DRAIN_GRACE]))
        except ValueError:
            raise _bad(DRAIN_GRACE, values[DRAIN_GRACE], "a duration such as 30s") from None
    extras = tuple(e.strip() for e in values.get(NO_PROXY, "").split(",") if e.strip())
    for entry in extras:
        if not _NO_PROXY_ENTRY.match(entry):
            raise _bad(NO_PROXY, entry, "a host, domain or address")
    return Overrides(
        image=image,
        resources=tuple(resources),
        config_map=config_map,
        listen_port=_port(LISTEN_PORT, values[LISTEN_PORT]) if LISTEN_PORT in values else None,
        admin_port=_port(ADMIN_PORT, values[ADMIN_PORT]) if ADMIN_PORT in values else None,
        drain_grace=values.get(DRAIN_GRACE),
        drain_grace_seconds=grace_seconds,
        set_proxy_env=_bool(SET_PROXY_ENV, values[SET_PROXY_ENV]) if SET_PROXY_ENV in values else False,
        set_https_proxy=_bool(SET_HTTPS_PROXY, values[SET_HTTPS_PROXY]) if SET_HTTPS_PROXY in values else True,
        no_proxy=extras,
        set_trust_env=_bool(SET_TRUST_ENV, values[SET_TRUST_ENV]) if SET_TRUST_ENV in values else True,
        lock=_bool(LOCK, values[LOCK]) if LOCK in values else None,
        unknown=tuple(sorted(k for k in values if k not in KNOWN)),
    )
