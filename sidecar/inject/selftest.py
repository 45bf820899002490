"""`python -m sidecar.inject.selftest`: the chart's `helm test` hook.

Posts an AdmissionReview for a labelled pod to the injector over TLS verified against the
webhook CA, and passes only if the answer is an allowed review with a patch that adds the
sidecar container.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from sidecar.inject.review import pod_create_review


def review(uid: str) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "egress-sidecar-selftest",
            "namespace": "default",
            "labels": {"egress-sidecar.io/inject": "true"},
        },
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }
    return pod_create_review(pod, uid, "default")


def check(answer: Any, uid: str) -> str | None:
    """None when the answer injects the sidecar, else what is wrong."""
    response = answer.get("response") if isinstance(answer, dict) else None
    if not isinstance(response, dict) or response.get("uid") != uid:
        return "the answer is not an AdmissionReview response for our uid"
    if response.get("allowed") is not True or response.get("patchType") != "JSONPatch":
        return f"not allowed with a JSONPatch: {json.dumps(response)[:300]}"
    patch = json.loads(base64.b64decode(response["patch"]))
    values = [
        op.get("value")
        for op in patch
        if op.get("path", "").startswith(("/spec/initContainers", "/spec/containers"))
    ]
    containers = [c for v in values for c in (v if isinstance(v, list) else [v]) if isinstance(c, dict)]
    if not any(c.get("name") == "egress-sidecar" for c in containers):
        return "the patch adds no egress-sidecar container"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.inject.selftest", description=__doc__)
    parser.add_argument("--url", required=True, help="https://<service>.<namespace>.svc/mutate")
    parser.add_argument("--ca", required=True, help="CA bundle that signed the injector's certificate")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    uid = str(uuid.uuid4())
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=args.ca), timeout=args.timeout) as client:
            answer = client.post(args.url, json=review(uid))
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        print(f"selftest: FAIL: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    try:
        problem = f"HTTP {answer.status_code}" if answer.status_code != 200 else check(answer.json(), uid)
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or a patch that does not decode
        problem = f"unreadable answer: {exc}"
    if problem:
        print(f"selftest: FAIL: {problem}", file=sys.stderr)
        return 1
    print(f"selftest: ok: {args.url} injected the sidecar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
