"""One source of truth: a chart that includes `egress-sidecar.container` statically gets exactly
the container the webhook injects.

A parent chart ("shop") lists egress-sidecar as a dependency, includes the named templates in its
Deployment, and is rendered by Helm; the same render's injector settings start the real webhook,
which injects a pod with the Deployment's app container; the two specs must be equal.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import trustme
import yaml

from tests.e2e.k8s_support import CHART, Injector, documents, one, render, run_injector, validate

PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
spec:
  selector:
    matchLabels: {app: shop}
  template:
    metadata:
      labels: {app: shop, egress-sidecar.io/injected: "true"}
    spec:
      {{- if .Values.fallback }}
      containers:
        - {{- include "egress-sidecar.container" . | nindent 10 }}
      {{- else }}
      initContainers:
        - {{- include "egress-sidecar.container" . | nindent 10 }}
      containers:
      {{- end }}
        - name: app
          image: shop/web:1.4
          env:
            {{- include "egress-sidecar.proxyEnv" . | nindent 12 }}
      volumes:
        {{- /* the other way to call it: in the subchart's own scope */}}
        - {{- include "egress-sidecar.volume" (index .Subcharts "egress-sidecar") | nindent 10 }}
"""


@pytest.fixture(scope="module")
def parent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parent") / "shop"
    (root / "templates").mkdir(parents=True)
    shutil.copytree(CHART, root / "charts" / "egress-sidecar")
    (root / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "shop",
                "version": "1.0.0",
                "appVersion": "7.7",
                "dependencies": [{"name": "egress-sidecar", "version": "0.1.0"}],
            }
        )
    )
    (root / "values.yaml").write_text("fallback: false\n")
    (root / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    return root


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    directory = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return directory / "tls.crt", directory / "tls.key", context


def _inject(injector: Injector, app: dict[str, Any]) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "shop-",
            "labels": {"app": "shop"},
            "annotations": {"egress-sidecar.io/set-proxy-env": "true"},
        },
        "spec": {"containers": [app]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "static-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": pod,
        },
    }
    response = injector.post("/mutate/namespace", review).json()["response"]
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    validate(patched)
    return patched


@pytest.mark.parametrize("mode", ["native", "fallback"])
def test_static_template_and_webhook_inject_the_same_spec(
    parent_chart: Path, tls: Any, tmp_path: Path, mode: str
) -> None:
    values = {
        "fallback": mode == "fallback",
        "egress-sidecar": {
            "sidecar": {
                "mode": mode,
                "drainGrace": "25s",
                "listenPort": 16001,
                "resources": {"limits": {"memory": "200Mi"}},
            }
        },
    }
    docs = documents(render(values, chart=parent_chart))
    deployment = one(docs, "Deployment", "shop")
    validate(deployment)
    static = deployment["spec"]["template"]["spec"]
    static_sidecar = (static["initContainers"] if mode == "native" else static["containers"])[0]
    static_app = next(c for c in static["containers"] if c["name"] == "app")
    # The subchart's values and appVersion, not the parent's, shape the static container.
    assert static_sidecar["image"].endswith(":0.1.0")
    assert {"name": "EGRESS_DRAIN_GRACE", "value": "25s"} in static_sidecar["env"]
    assert static_sidecar["resources"]["limits"]["memory"] == "200Mi"

    settings = tmp_path / "settings.yaml"
    settings.write_text(one(docs, "ConfigMap", "es-egress-sidecar-injector")["data"]["settings.yaml"])
    with run_injector(settings, tls[0], tls[1], tls[2]) as injector:
        app_without_proxy = {"name": "app", "image": "shop/web:1.4", "env": []}
        injected = _inject(injector, app_without_proxy)["spec"]

    if mode == "native":
        assert injected["initContainers"] == [static_sidecar]
        assert injected["containers"] == [static_app]
    else:
        assert "initContainers" not in injected
        assert injected["containers"] == [static_sidecar, static_app]
    assert injected["volumes"] == static["volumes"]
