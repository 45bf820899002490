"""Pod -> JSONPatch (RFC 6902): the whole injection decision and mutation, pure and side-effect free.

The patch creates every parent it needs (`metadata.annotations`, `spec.initContainers`,
`spec.volumes`) because the API server sends pods without empty maps and lists. Operations on
app containers come before the sidecar is inserted so their indexes stay those of the pod sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.inject import overrides as ann
from sidecar.inject.overrides import InjectError, Overrides
from sidecar.inject.settings import (
    ADMIN_PORT_ENV,
    ADMIN_PORT_NAME,
    DRAIN_GRACE_ENV,
    LISTEN_PORT_ENV,
    Settings,
)
from sidecar.policy.metadata import NO_PROXY_ENTRIES as METADATA_NO_PROXY

Patch = list[dict[str, Any]]
PROXY_ENV_NAMES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")
# What OpenSSL (Python ssl, Ruby, PHP), requests, curl, Node and git read for extra or replacement
# trust: pointed at the interception bundle (system roots + the pod's CA) when interception is on.
TRUST_ENV_NAMES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO")
BUNDLE_FILE = "bundle.pem"  # sidecar/intercept/ca.py writes it
# Kubernetes' default when the pod does not say (PodSpec.terminationGracePeriodSeconds).
DEFAULT_TERMINATION_GRACE = 30
# Headroom between the end of the sidecar's drain and the kubelet's SIGKILL.
GRACE_HEADROOM = 5


@dataclass(frozen=True)
class Result:
    patch: Patch
    reason: str  # injected | not-opted-in | opted-out | already-injected | host-network | run-to-completion
    warnings: tuple[str, ...] = field(default=())


def pointer(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901): `~` and `/` inside a key are escaped."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def decide(labels: Mapping[str, object], *, namespace_opted_in: bool) -> str:
    """Whether the pod's own label or its namespace asks for the sidecar; the pod's "false" wins."""
    value = labels.get(ann.INJECT_LABEL)
    if value == "false":
        return "opted-out"
    if value == "true" or namespace_opted_in:
        return "inject"
    return "not-opted-in"


def proxy_env(listen_port: int, no_proxy: tuple[str, ...], https: bool = True) -> list[dict[str, str]]:
    """HTTP_PROXY, HTTPS_PROXY (unless `https` is off) and NO_PROXY for app containers, both
    spellings (curl reads only lower-case http_proxy; Go and Python read either). HTTPS_PROXY
    is the sidecar too (http://: the app's TLS goes through a CONNECT tunnel, tunnel.py)."""
    proxy = f"http://127.0.0.1:{listen_port}"
    skip = ",".join(dict.fromkeys(no_proxy))  # ordered, duplicates dropped
    env = [{"name": "HTTP_PROXY", "value": proxy}, {"name": "http_proxy", "value": proxy}]
    if https:
        env += [{"name": "HTTPS_PROXY", "value": proxy}, {"name": "https_proxy", "value": proxy}]
    return env + [{"name": "NO_PROXY", "value": skip}, {"name": "no_proxy", "value": skip}]


def trust_env(ca_dir: str) -> list[dict[str, str]]:
    """The trust variables for app containers, each naming the interception bundle."""
    bundle = ca_dir.rstrip("/") + "/" + BUNDLE_FILE
    return [{"name": name, "value": bundle} for name in TRUST_ENV_NAMES]


def _app_ops(apps: list[dict[str, Any]], proxy: list[dict[str, str]] | None,
             trust: list[dict[str, str]] | None, ca_mount: dict[str, Any] | None) -> Patch:
    """Env (proxy and/or trust variables, replacing the app's own of those names) and the CA mount."""
    # Only the names set here are replaced (set-https-proxy "false" leaves an app's own HTTPS_PROXY).
    replaced = {e["name"] for e in (proxy or []) + (trust or [])}
    patch: Patch = []
    for index, container in enumerate(apps):
        if proxy or trust:
            kept = [
                e for e in container.get("env") or []
                if not (isinstance(e, dict) and e.get("name") in replaced)
            ]
            patch.append({"op": "add", "path": pointer("spec", "containers", index, "env"),
                          "value": kept + (proxy or []) + (trust or [])})
        if ca_mount is not None:
            mounts = container.get("volumeMounts")
            _append(patch, pointer("spec", "containers", index, "volumeMounts"), mounts, dict(ca_mount), first=False)
    return patch


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    """Set one env var in place (keeping the rendered order), or append it."""
    env = container.setdefault("env", [])
    for entry in env:
        if entry.get("name") == name:
            entry.pop("valueFrom", None)
            entry["value"] = value
            return
    env.append({"name": name, "value": value})


def sidecar_container(settings: Settings, over: Overrides) -> dict[str, Any]:
    """The rendered container with this pod's overrides applied."""
    container = settings.fresh_container()
    if over.image is not None:
        container["image"] = over.image
    for section, resource, quantity in over.resources:
        resources = container.setdefault("resources", {})
        resources.setdefault(section, {})[resource] = quantity
    if over.listen_port is not None:
        _set_env(container, LISTEN_PORT_ENV, str(over.listen_port))
    if over.admin_port is not None:
        _set_env(container, ADMIN_PORT_ENV, str(over.admin_port))
        for port in container.get("ports") or []:
            if port.get("name") == ADMIN_PORT_NAME:
                port["containerPort"] = over.admin_port
    if over.drain_grace is not None:
        _set_env(container, DRAIN_GRACE_ENV, over.drain_grace)
    return container


def sidecar_volume(settings: Settings, over: Overrides) -> dict[str, Any]:
    volume = settings.fresh_volume()
    if over.config_map is not None:
        volume["configMap"]["name"] = over.config_map
    return volume


def _containers(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        raise InjectError(f"spec.{key} must be a list of containers")
    return value


def _add_entries(patch: Patch, parent: str, current: object, entries: dict[str, str]) -> None:
    """Add map entries, creating the map when the pod has none."""
    if not entries:
        return
    if not isinstance(current, dict):
        patch.append({"op": "add", "path": parent, "value": entries})
        return
    for key, value in entries.items():
        patch.append({"op": "add", "path": parent + pointer(key), "value": value})


def _append(patch: Patch, path: str, current: object, item: dict[str, Any], *, first: bool) -> None:
    """Insert into a list (first or last), creating the list when the pod has none."""
    if not isinstance(current, list) or not current:
        patch.append({"op": "add", "path": path, "value": [item]})
    else:
        patch.append({"op": "add", "path": path + ("/0" if first else "/-"), "value": item})


def _declared_ports(containers: list[dict[str, Any]]) -> dict[int, str]:
    ports: dict[int, str] = {}
    for container in containers:
        for port in container.get("ports") or []:
            if isinstance(port, dict) and isinstance(port.get("containerPort"), int):
                ports[port["containerPort"]] = str(container.get("name"))
    return ports


def _refuse_conflicts(
    spec: dict[str, Any], containers: list[dict[str, Any]], listen: int, admin: int, volume_name: str
) -> None:
    """Refuse what would make the pod fail at run time: shared ports or a volume name clash."""
    if listen == admin:
        raise InjectError(f"listen port and admin port are both {listen}")
    taken = _declared_ports(containers)
    for port, which in ((listen, ann.LISTEN_PORT), (admin, ann.ADMIN_PORT)):
        if port in taken:
            raise InjectError(
                f"port {port} is already used by container {taken[port]!r}; "
                f"move the sidecar with annotation {which}"
            )
    volumes = spec.get("volumes")
    if isinstance(volumes, list) and any(
        isinstance(v, dict) and v.get("name") == volume_name for v in volumes
    ):
        raise InjectError(f"the pod already has a volume named {volume_name!r}")


def _refuse_ca_conflicts(spec: dict[str, Any], apps: list[dict[str, Any]], name: str, ca_dir: str) -> None:
    """The CA volume's name and mount path must be free in the pod and its app containers."""
    volumes = spec.get("volumes")
    if isinstance(volumes, list) and any(isinstance(v, dict) and v.get("name") == name for v in volumes):
        raise InjectError(f"the pod already has a volume named {name!r}")
    for container in apps:
        for mount in container.get("volumeMounts") or []:
            if isinstance(mount, dict) and mount.get("mountPath", "").rstrip("/") == ca_dir.rstrip("/"):
                raise InjectError(f"container {container.get('name')!r} already mounts something at {ca_dir}, "
                                  "where the interception CA goes")


def _metadata_ops(
    pod: Mapping[str, Any], settings: Settings, admin: int, apps: list[dict[str, Any]]
) -> Patch:
    """The injected label, the idempotency marker and the scrape annotations."""
    metadata = _mapping(pod.get("metadata"))
    annotations = _mapping(metadata.get("annotations"))
    new_annotations = {ann.STATUS_ANNOTATION: "injected"}
    if settings.prometheus_annotations and "prometheus.io/scrape" not in annotations:
        # Only when the app has none of its own: overwriting would stop its own metrics being scraped.
        new_annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(admin),
                "prometheus.io/path": "/metrics",
            }
        )
    if not settings.native and apps and "kubectl.kubernetes.io/default-container" not in annotations:
        # The sidecar goes first in fallback mode; keep `kubectl logs/exec` on the app by default.
        new_annotations["kubectl.kubernetes.io/default-container"] = str(apps[0].get("name"))
    labels = {ann.INJECTED_LABEL: "true"}
    if not isinstance(pod.get("metadata"), dict):
        return [
            {"op": "add", "path": "/metadata", "value": {"labels": labels, "annotations": new_annotations}}
        ]
    patch: Patch = []
    _add_entries(patch, "/metadata/labels", metadata.get("labels"), labels)
    _add_entries(patch, "/metadata/annotations", metadata.get("annotations"), new_annotations)
    return patch


def _unsupported(spec: dict[str, Any], settings: Settings) -> Result | None:
    """Pods the sidecar would break: skipped (not refused), with a warning kubectl shows."""
    if spec.get("hostNetwork") is True:
        # The sidecar's 127.0.0.1 ports would be the node's, shared by every such pod on it.
        warning = "hostNetwork pods are not injected: the sidecar's ports would be the node's"
        return Result([], "host-network", (warning,))
    if not settings.native and spec.get("restartPolicy") in ("Never", "OnFailure"):
        # A regular sidecar container never exits, so a Job's pod would never complete;
        # native sidecars (Kubernetes >= 1.29) are stopped when the app containers finish.
        warning = (
            "pods that run to completion (Jobs) are not injected in fallback mode: "
            "the sidecar would keep them running"
        )
        return Result([], "run-to-completion", (warning,))
    return None


def pod_patch(pod: Mapping[str, Any], settings: Settings, *, namespace_opted_in: bool) -> Result:
    """The JSONPatch that injects the sidecar into `pod`, or an empty one with the reason why not."""
    metadata = _mapping(pod.get("metadata"))
    labels, annotations = _mapping(metadata.get("labels")), _mapping(metadata.get("annotations"))
    verdict = decide(labels, namespace_opted_in=namespace_opted_in)
    if verdict != "inject":
        return Result([], verdict)
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise InjectError("the pod has no spec")
    apps, inits = _containers(spec, "containers"), _containers(spec, "initContainers")
    if annotations.get(ann.STATUS_ANNOTATION) == "injected" or any(
        c.get("name") == settings.name for c in apps + inits
    ):
        return Result([], "already-injected")
    skipped = _unsupported(spec, settings)
    if skipped is not None:
        return skipped
    over = ann.parse(annotations)
    warnings = tuple(f"unknown annotation {key} ignored" for key in over.unknown)
    listen = over.listen_port or settings.listen_port
    admin = over.admin_port or settings.admin_port
    volume = sidecar_volume(settings, over)
    _refuse_conflicts(spec, apps + inits, listen, admin, volume["name"])

    locked = settings.lock_default if over.lock is None else over.lock
    lock_container = settings.fresh_lock_container() if locked else None
    if lock_container is not None and any(c.get("name") == lock_container["name"] for c in apps + inits):
        raise InjectError(f"the pod already has a container named {lock_container['name']!r}")
    transparent = settings.transparent_port
    if locked and transparent:
        taken = _declared_ports(apps + inits)
        if transparent in taken:
            raise InjectError(f"port {transparent} is the egress lock's transparent listener "
                              f"(listen.transparent_port) and already used by container {taken[transparent]!r}")
    ca_volume = settings.fresh_ca_volume()
    ca_mount = None
    if ca_volume is not None and settings.ca_dir is not None:
        _refuse_ca_conflicts(spec, apps, ca_volume["name"], settings.ca_dir)
        ca_mount = {"name": ca_volume["name"], "mountPath": settings.ca_dir, "readOnly": True}
    proxy = None
    if over.set_proxy_env:
        no_proxy = settings.no_proxy + over.no_proxy
        if settings.metadata_identity and not locked:
            # Without the lock the sidecar cannot see the app's metadata calls, and SDKs send them
            # without a proxy anyway: let them go direct. With the lock they are captured and
            # decided by policy.metadata: identity, so the proxy may see them too.
            no_proxy += METADATA_NO_PROXY
        proxy = proxy_env(listen, no_proxy, over.set_https_proxy)
    trust = trust_env(settings.ca_dir) if ca_mount is not None and settings.ca_dir and over.set_trust_env else None
    patch: Patch = _app_ops(apps, proxy, trust, ca_mount)
    container = sidecar_container(settings, over)
    if settings.native:
        _append(patch, "/spec/initContainers", spec.get("initContainers"), container, first=True)
    else:
        _append(patch, "/spec/containers", spec.get("containers"), container, first=True)
    if lock_container is not None:
        # First of all init containers: before the native sidecar (so its rules are in before
        # anything else of the pod runs). In fallback mode the pod's own init containers then
        # run under the lock with no sidecar yet: their outbound TCP is refused (README).
        initial = spec.get("initContainers") if not settings.native else [container]
        _append(patch, "/spec/initContainers", initial, lock_container, first=True)
    _append(patch, "/spec/volumes", spec.get("volumes"), volume, first=False)
    if ca_volume is not None:
        patch.append({"op": "add", "path": "/spec/volumes/-", "value": ca_volume})
    grace = over.drain_grace_seconds if over.drain_grace_seconds is not None else settings.drain_grace
    needed = math.ceil(settings.pre_stop_seconds + grace) + GRACE_HEADROOM
    current = spec.get("terminationGracePeriodSeconds")
    if (current if isinstance(current, int) else DEFAULT_TERMINATION_GRACE) < needed:
        patch.append({"op": "add", "path": "/spec/terminationGracePeriodSeconds", "value": needed})
    patch.extend(_metadata_ops(pod, settings, admin, apps))
    return Result(patch, "injected", warnings)
