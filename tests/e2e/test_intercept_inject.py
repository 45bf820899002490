"""Interception in Kubernetes: the chart and the real webhook give app containers the CA bundle.

With `sidecar.config` turning interception on, the rendered chart, the webhook's patched Pod and
a parent chart's static injection all carry the CA emptyDir, the sidecar's writable mount, the
app's read-only mount and the five trust variables, and all validate for Kubernetes 1.29 and the
newest schema. Without interception none of it appears.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonpatch
import pytest
import trustme
import yaml

from sidecar.inject.patch import TRUST_ENV_NAMES
from tests.e2e.k8s_support import (
    CHART,
    NAMESPACE,
    Injector,
    documents,
    injector_settings,
    one,
    render,
    run_injector,
    validate,
)

CA_DIR = "/var/run/egress-sidecar/ca"
INTERCEPT = {"sidecar": {"config": {"intercept": {"hosts": ["*.stripe.com"]}}}}
ROUTE_HOSTS = {"sidecar": {"config": {"routes": [
    {"name": "pay", "match_hosts": ["api.pay.test"], "headers": {"authorization": {"value": "Bearer x"}}}]}}}
CA_MOUNT_RO = {"name": "egress-sidecar-ca", "mountPath": CA_DIR, "readOnly": True}
CA_VOLUME = {"name": "egress-sidecar-ca", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}}


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


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory, tls: Any) -> Iterator[Injector]:
    settings = tmp_path_factory.mktemp("settings") / "settings.yaml"
    settings.write_text(injector_settings(documents(render(INTERCEPT))))
    with run_injector(settings, tls[0], tls[1], tls[2]) as running:
        yield running


def admit(injector: Injector, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "web-", "labels": {"egress-sidecar.io/inject": "true"},
                        "annotations": annotations or {}},
           "spec": {"containers": [{"name": "app", "image": "shop/web:1.4"}]}}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "request": {"uid": "i-1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "namespace": "shop",
                          "operation": "CREATE", "object": pod}}
    response = injector.post("/mutate", review).json()["response"]
    assert response["allowed"] is True
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    validate(patched)  # Kubernetes 1.29 and the newest schema, strict
    return patched


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_the_webhook_mounts_the_ca_read_only_and_sets_the_trust_variables(injector: Injector) -> None:
    patched = admit(injector)
    app = patched["spec"]["containers"][0]
    assert {name: env(app)[name] for name in TRUST_ENV_NAMES} == dict.fromkeys(TRUST_ENV_NAMES, CA_DIR + "/bundle.pem")
    assert app["volumeMounts"] == [CA_MOUNT_RO]
    sidecar = patched["spec"]["initContainers"][0]
    assert {"name": "egress-sidecar-ca", "mountPath": CA_DIR} in sidecar["volumeMounts"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"  # 503 until the bundle is written
    assert CA_VOLUME in patched["spec"]["volumes"]


def test_the_annotation_opts_a_pod_out_of_the_trust_variables(injector: Injector) -> None:
    app = admit(injector, {"egress-sidecar.io/set-trust-env": "false"})["spec"]["containers"][0]
    assert not set(TRUST_ENV_NAMES) & set(env(app))


@pytest.mark.parametrize("values", [INTERCEPT, ROUTE_HOSTS], ids=["intercept-hosts", "route-match-hosts"])
def test_the_chart_renders_valid_objects_with_the_ca_in_the_settings(values: dict[str, Any]) -> None:
    docs = documents(render(values))
    for doc in docs:
        if doc["kind"] not in {"PodMonitor", "Certificate", "Issuer"}:
            validate(doc)
    settings = yaml.safe_load(injector_settings(docs))
    assert settings["intercept"] == {"caDir": CA_DIR, "volume": CA_VOLUME}
    assert {"name": "egress-sidecar-ca", "mountPath": CA_DIR} in settings["container"]["volumeMounts"]
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert not report["errors"], report


def test_without_interception_the_settings_carry_no_ca() -> None:
    settings = yaml.safe_load(injector_settings(documents(render({}))))
    assert "intercept" not in settings
    assert [m["name"] for m in settings["container"]["volumeMounts"]] == ["egress-sidecar-config"]


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
      initContainers:
        - {{- include "egress-sidecar.container" . | nindent 10 }}
      containers:
        - name: app
          image: shop/web:1.4
          env:
            {{- include "egress-sidecar.trustEnv" . | nindent 12 }}
          volumeMounts:
            {{- include "egress-sidecar.caMount" . | nindent 12 }}
      volumes:
        - {{- include "egress-sidecar.volume" . | nindent 10 }}
        {{- include "egress-sidecar.caVolume" . | nindent 8 }}
"""


def test_static_injection_with_interception_equals_the_webhooks(tmp_path: Path, tls: Any) -> None:
    root = tmp_path / "shop"
    (root / "templates").mkdir(parents=True)
    shutil.copytree(CHART, root / "charts" / "egress-sidecar")
    (root / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "shop", "version": "1.0.0", "appVersion": "7.7",
        "dependencies": [{"name": "egress-sidecar", "version": "0.1.0"}]}))
    (root / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    docs = documents(render({"egress-sidecar": INTERCEPT}, chart=root))
    deployment = one(docs, "Deployment", "shop")
    validate(deployment)
    static = deployment["spec"]["template"]["spec"]
    settings = tmp_path / "settings.yaml"
    settings.write_text(injector_settings(docs))
    with run_injector(settings, tls[0], tls[1], tls[2]) as running:
        injected = admit(running)["spec"]
    assert injected["initContainers"] == static["initContainers"]
    assert injected["volumes"] == static["volumes"]
    static_app, injected_app = static["containers"][0], injected["containers"][0]
    assert injected_app["volumeMounts"] == static_app["volumeMounts"] == [CA_MOUNT_RO]
    assert injected_app["env"] == static_app["env"]
