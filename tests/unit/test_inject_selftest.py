"""The helm-test hook's verdict on an injector answer (pure part of sidecar.inject.selftest)."""

from __future__ import annotations

import base64
import json
from typing import Any

from sidecar.inject.review import handle
from sidecar.inject.selftest import check, review
from tests.unit.inject_data import NATIVE_SETTINGS


def _response(**fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": "u", **fields},
    }


def test_a_real_injector_answer_passes() -> None:
    reply = handle(json.dumps(review("u")).encode(), NATIVE_SETTINGS, namespace_opted_in=False)
    assert check(json.loads(reply.body), "u") is None


def test_answers_that_do_not_inject_fail_with_a_reason() -> None:
    other_patch = base64.b64encode(
        json.dumps([{"op": "add", "path": "/metadata/labels", "value": {}}]).encode()
    )
    assert "not an AdmissionReview response" in str(check({"response": {"uid": "other"}}, "u"))
    assert "not allowed with a JSONPatch" in str(check(_response(allowed=True), "u"))
    assert "adds no egress-sidecar container" in str(
        check(_response(allowed=True, patchType="JSONPatch", patch=other_patch.decode()), "u")
    )
