"""Shared test data for the injector's unit tests: one settings object and AdmissionReview builder."""

from __future__ import annotations

import copy
from typing import Any

from sidecar.inject import settings as settings_module
from sidecar.inject.review import pod_create_review

CONTAINER: dict[str, Any] = {
    "name": "egress-sidecar",
    "image": "egress-sidecar:0.1.0",
    "restartPolicy": "Always",
    "args": ["run", "--config", "/etc/egress-sidecar/config.yaml"],
    "env": [
        {"name": "EGRESS_LISTEN_PORT", "value": "15001"},
        {"name": "EGRESS_ADMIN_PORT", "value": "15090"},
        {"name": "EGRESS_DRAIN_GRACE", "value": "20s"},
    ],
    "ports": [{"name": "egress-admin", "containerPort": 15090, "protocol": "TCP"}],
    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}},
    "volumeMounts": [{"name": "egress-sidecar-config", "mountPath": "/etc/egress-sidecar", "readOnly": True}],
}
RAW_SETTINGS: dict[str, Any] = {
    "container": CONTAINER,
    "volume": {"name": "egress-sidecar-config", "configMap": {"name": "egress-sidecar-config"}},
    "noProxy": ["localhost", "127.0.0.1", ".svc", ".cluster.local"],
    "prometheusAnnotations": True,
}


def make_settings(native: bool = True) -> settings_module.Settings:
    raw = copy.deepcopy(RAW_SETTINGS)
    if not native:
        del raw["container"]["restartPolicy"]
    return settings_module.from_mapping(raw)


NATIVE_SETTINGS = make_settings()


def admission_review(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, uid: str = "uid-1"
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-", "namespace": "shop"}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    return pod_create_review(pod, uid, "shop")


def pod(
    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, *,
    metadata: dict[str, Any] | None = None, containers: list[dict[str, Any]] | None = None, **spec: Any,
) -> dict[str, Any]:
    """A Pod as the API server hands it to the webhook: `metadata` adds fields (namespace...)."""
    meta: dict[str, Any] = {"generateName": "web-", **(metadata or {})}
    if labels is not None:
        meta["labels"] = labels
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": containers or [{"name": "app", "image": "app:1"}], **spec},
    }
