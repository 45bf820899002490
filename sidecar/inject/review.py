"""AdmissionReview v1 in, AdmissionReview v1 out: pure, no I/O.

A body we cannot answer at all (not JSON, not an AdmissionReview v1, no request uid) is a 400:
the API server then applies the webhook's failurePolicy. A request we can answer always gets an
AdmissionReview: allowed with a patch, allowed without one (not a Pod, not CREATE, not opted
in, already injected), or refused with code 400 when an opted-in pod cannot be injected as its
annotations ask (the user sees the message in `kubectl` at once).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from sidecar.inject.overrides import InjectError
from sidecar.inject.patch import pod_patch
from sidecar.inject.settings import Settings

API_VERSION = "admission.k8s.io/v1"


@dataclass(frozen=True)
class Reply:
    status: int  # HTTP status
    body: bytes
    outcome: str  # injected | skipped | denied | bad_request: the metric label
    detail: str  # reason for the log line
    pod: str = ""  # namespace/name for the log line


class BadReview(ValueError):
    """The body is not an AdmissionReview v1 we can answer."""


def _bad(detail: str) -> Reply:
    return Reply(400, detail.encode() + b"\n", "bad_request", detail)


def _review(response: dict[str, Any]) -> bytes:
    return json.dumps(
        {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}, separators=(",", ":")
    ).encode()


def _request(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadReview("body is not JSON") from None
    if (
        not isinstance(review, dict)
        or review.get("apiVersion") != API_VERSION
        or review.get("kind") != "AdmissionReview"
    ):
        raise BadReview(f"body is not an {API_VERSION} AdmissionReview")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReview("AdmissionReview has no request.uid")
    return request


def _pod_name(request: dict[str, Any]) -> str:
    obj = request.get("object")
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name") or metadata.get("generateName") or request.get("name") or "?"
    return f"{request.get('namespace') or '?'}/{name}"


def handle(body: bytes, settings: Settings, *, namespace_opted_in: bool) -> Reply:
    """Answer one AdmissionReview body."""
    try:
        request = _request(body)
    except BadReview as exc:
        return _bad(str(exc))
    uid, pod = request["uid"], _pod_name(request)
    kind = request.get("kind")
    if not isinstance(kind, dict) or (kind.get("group"), kind.get("version"), kind.get("kind")) != (
        "",
        "v1",
        "Pod",
    ):
        warning = f"egress-sidecar injector only handles v1 Pods, got {kind!r}: nothing injected"
        return Reply(
            200, _review({"uid": uid, "allowed": True, "warnings": [warning]}), "skipped", "not-a-pod", pod
        )
    if request.get("operation") != "CREATE":
        return Reply(200, _review({"uid": uid, "allowed": True}), "skipped", "not-create", pod)
    obj = request.get("object")
    try:
        if not isinstance(obj, dict):
            raise InjectError("request.object is not a Pod object")
        result = pod_patch(obj, settings, namespace_opted_in=namespace_opted_in)
    except InjectError as exc:
        message = f"egress-sidecar: {exc}"
        response = {"uid": uid, "allowed": False, "status": {"code": 400, "message": message}}
        return Reply(200, _review(response), "denied", str(exc), pod)
    response = {"uid": uid, "allowed": True}
    if result.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(result.patch, separators=(",", ":")).encode()
        ).decode()
    if result.warnings:
        response["warnings"] = [f"egress-sidecar: {w}" for w in result.warnings]
    outcome = "injected" if result.patch else "skipped"
    return Reply(200, _review(response), outcome, result.reason, pod)


def pod_create_review(pod: dict[str, Any], uid: str, namespace: str) -> dict[str, Any]:
    """An AdmissionReview v1 request for creating `pod` (what the API server sends us)."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    }
