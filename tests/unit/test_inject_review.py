"""AdmissionReview v1 handling: answers, refusals and 400s, without sockets."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sidecar.inject.review import handle
from tests.unit.inject_data import NATIVE_SETTINGS, admission_review


def answer(body: bytes, ns: bool = False) -> tuple[int, dict[str, Any] | bytes, str]:
    reply = handle(body, NATIVE_SETTINGS, namespace_opted_in=ns)
    if reply.status == 200:
        return reply.status, json.loads(reply.body)["response"], reply.outcome
    return reply.status, reply.body, reply.outcome


def encode(review: dict[str, Any]) -> bytes:
    return json.dumps(review).encode()


def test_labelled_pod_create_is_allowed_with_a_base64_json_patch() -> None:
    status, response, outcome = answer(encode(admission_review(labels={"egress-sidecar.io/inject": "true"})))
    assert status == 200 and outcome == "injected"
    assert isinstance(response, dict)
    assert response["uid"] == "uid-1" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    assert any(op["path"] == "/spec/initContainers" for op in ops)


def test_not_opted_in_pod_is_allowed_without_patch() -> None:
    status, response, outcome = answer(encode(admission_review()))
    assert status == 200 and outcome == "skipped"
    assert response == {"uid": "uid-1", "allowed": True}


def test_namespace_path_injects_unlabelled_pod() -> None:
    _, response, outcome = answer(encode(admission_review()), ns=True)
    assert outcome == "injected" and isinstance(response, dict) and "patch" in response


def test_bad_override_on_opted_in_pod_is_denied_with_code_400_and_message() -> None:
    review = admission_review(
        labels={"egress-sidecar.io/inject": "true"}, annotations={"egress-sidecar.io/memory-limit": "plenty"}
    )
    status, response, outcome = answer(encode(review))
    assert status == 200 and outcome == "denied"
    assert isinstance(response, dict) and response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "egress-sidecar.io/memory-limit" in response["status"]["message"]


def test_unknown_annotation_is_a_warning() -> None:
    review = admission_review(
        labels={"egress-sidecar.io/inject": "true"}, annotations={"egress-sidecar.io/imgae": "x"}
    )
    _, response, _ = answer(encode(review))
    assert isinstance(response, dict) and response["warnings"] == [
        "egress-sidecar: unknown annotation egress-sidecar.io/imgae ignored"
    ]


def test_wrong_kind_is_allowed_untouched_with_a_warning() -> None:
    review = admission_review(labels={"egress-sidecar.io/inject": "true"})
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    _, response, outcome = answer(encode(review))
    assert outcome == "skipped" and isinstance(response, dict)
    assert "patch" not in response and "only handles v1 Pods" in response["warnings"][0]


def test_update_operation_is_not_patched() -> None:
    review = admission_review(labels={"egress-sidecar.io/inject": "true"})
    review["request"]["operation"] = "UPDATE"
    _, response, _ = answer(encode(review))
    assert response == {"uid": "uid-1", "allowed": True}


def test_object_that_is_not_a_mapping_is_denied_not_crashed() -> None:
    review = admission_review()
    review["request"]["object"] = ["not", "a", "pod"]
    _, response, outcome = answer(encode(review))
    assert outcome == "denied" and isinstance(response, dict) and response["allowed"] is False


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", b"body is not JSON"),
        (b"\xff\xfe", b"body is not JSON"),
        (b"[]", b"not an admission.k8s.io/v1 AdmissionReview"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
            b"not an admission",
        ),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            b"no request.uid",
        ),
        (
            json.dumps(
                {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 7}}
            ).encode(),
            b"no request.uid",
        ),
    ],
)
def test_unanswerable_bodies_are_400_with_a_one_line_reason(body: bytes, detail: bytes) -> None:
    status, text, outcome = answer(body)
    assert status == 400 and outcome == "bad_request"
    assert isinstance(text, bytes) and detail in text and text.count(b"\n") == 1
