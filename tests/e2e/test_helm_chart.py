"""The Helm chart, rendered and linted by Helm v4's own engine (helm-python-sdk), no cluster.

Every rendered object validates against the Kubernetes schemas; the webhook's selectors are
evaluated against real label sets; the generated TLS material is checked with cryptography.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.e2e.k8s_support import CHART, NAMESPACE, RELEASE, REPO, documents, find, one, render, validate

MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "cert-manager-issuer": {
        "webhook": {
            "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
        }
    },
    "podmonitor": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "fallback": {"sidecar": {"mode": "fallback"}},
    "static-only": {"injector": {"enabled": False}},
    "fail-closed": {
        "webhook": {"failurePolicy": "Fail"},
        "injector": {"priorityClassName": "system-cluster-critical"},
    },
    "lock": {"sidecar": {"lock": {"enabled": True}, "config": {"policy": {"metadata": "identity"}}}},
    "lock-fallback": {"sidecar": {"mode": "fallback", "lock": {"enabled": True}}},
    "config-override": {
        "sidecar": {
            "config": {"policy": {"default": "deny", "allow_hosts": ["api.github.com"]}},
            "configNamespaces": ["shop", "billing"],
        }
    },
}
# Custom resources have no schema in kubernetes-validate; their fields are asserted below.
CRDS = {"PodMonitor", "Certificate", "Issuer"}
INJECTOR = f"{RELEASE}-egress-sidecar-injector"


@pytest.mark.parametrize("mode", MODES)
def test_helm_lint_strict_passes(mode: str) -> None:
    _assert_lint_clean(MODES[mode], "v1.29.0")


def test_helm_lint_strict_passes_on_the_oldest_kubernetes_the_chart_allows() -> None:
    _assert_lint_clean({}, "v1.25.0")  # Chart.yaml's kubeVersion floor; auto mode means fallback there


def _assert_lint_clean(values: dict[str, Any], kube: str) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=kube)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(("kube", "native"), [("v1.28.9", False), ("v1.29.0", True), ("v1.33.1", True)])
def test_auto_mode_picks_native_sidecars_from_kubernetes_1_29(kube: str, native: bool) -> None:
    docs = documents(render(kube_version=kube))
    container = yaml.safe_load(one(docs, "ConfigMap", INJECTOR)["data"]["settings.yaml"])["container"]
    assert ("restartPolicy" in container) is native
    assert ("lifecycle" in container) is not native


def test_native_mode_on_a_cluster_without_native_sidecars_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match="sidecar.mode native needs Kubernetes 1.29"):
        render({"sidecar": {"mode": "native"}}, kube_version="v1.27.3")
    assert documents(render({"sidecar": {"mode": "native"}}, kube_version="v1.28.0"))  # feature gate there


def test_lint_fails_loudly_on_a_broken_chart(tmp_path: Path) -> None:
    """The lint check can fail: a template that does not parse is reported."""
    import shutil

    broken = tmp_path / "egress-sidecar"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "service.yaml").write_text("{{ if }}\n")
    report = helm.lint(broken, {}, strict=True, namespace=NAMESPACE)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 2]


@pytest.mark.parametrize("mode", MODES)
def test_every_rendered_object_validates(mode: str) -> None:
    docs = documents(render(MODES[mode]))
    assert docs
    for doc in docs:
        if doc["kind"] not in CRDS:
            validate(doc)


def test_schema_validation_catches_unknown_and_mistyped_fields() -> None:
    """The validator these tests rely on really rejects bad objects, for both Kubernetes versions."""
    good = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 80}]}]},
    }
    validate(good)
    kubernetes_validate.validate(good, "1.29.0", strict=True)  # agrees with the library's own entry point
    for bad in ({"restartPolice": "Always"}, {"ports": [{"containerPort": "eighty"}]}):
        pod = json.loads(json.dumps(good))
        pod["spec"]["containers"][0].update(bad)
        with pytest.raises(AssertionError, match="invalid for Kubernetes 1.29.0"):
            validate(pod)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook": {"failurePolicy": "Sometimes"}}, "/webhook/failurePolicy"),
        ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds"),
        ({"sidecar": {"mode": "sometimes"}}, "/sidecar/mode"),
        ({"sidecar": {"listenPort": 0}}, "/sidecar/listenPort"),
        ({"sidecar": {"drainGrace": "twenty"}}, "/sidecar/drainGrace"),
        ({"sidecar": {"resources": {"limits": {"memory": "lots"}}}}, "/sidecar/resources/limits/memory"),
        ({"injectr": {}}, "injectr"),
    ],
)
def test_values_schema_rejects_bad_values_by_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(values)


def test_values_yaml_documents_every_key() -> None:
    """Every key has a comment on the line above (or its own line), except the entries of
    example data blocks (resources, securityContext, labels) whose key itself is documented."""
    data_blocks = {"resources", "securityContext", "podSecurityContext", "labels"}
    ancestors: list[tuple[int, str]] = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent, key = len(line) - len(line.lstrip()), stripped.split(":", 1)[0]
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        inside_data = any(name in data_blocks for _, name in ancestors)
        ancestors.append((indent, key))
        if inside_data:
            continue
        documented = lines[index - 1].strip().startswith("#") or " # " in line
        assert documented, f"values.yaml line {index + 1} is undocumented: {line!r}"


def test_injector_deployment_is_hardened_and_highly_available() -> None:
    docs = documents(render())
    deployment = one(docs, "Deployment", INJECTOR)
    spec = deployment["spec"]
    pod_spec = spec["template"]["spec"]
    container = pod_spec["containers"][0]
    assert spec["replicas"] == 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["args"][0] == "inject"
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "webhook",
        "scheme": "HTTPS",
    }
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert (
        pod_spec["securityContext"]["runAsNonRoot"]
        and pod_spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod_spec["automountServiceAccountToken"] is False
    pdb = one(docs, "PodDisruptionBudget", INJECTOR)
    labels = spec["template"]["metadata"]["labels"]
    assert (
        pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    )
    service = one(docs, "Service", INJECTOR)
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"
    mounted = {v["name"]: v for v in pod_spec["volumes"]}
    assert mounted["settings"]["configMap"]["name"] == INJECTOR


def test_settings_change_rolls_the_injector() -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(documents(render(values)), "Deployment", INJECTOR)
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/settings"])

    assert checksum({}) == checksum({}) != checksum({"sidecar": {"drainGrace": "30s"}})


# --- the webhook configuration and its selectors -------------------------------------------------


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics (matchLabels AND every matchExpression)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _called(
    webhooks: list[dict[str, Any]], namespace: str, ns_labels: dict[str, str], pod_labels: dict[str, str]
) -> list[str]:
    """The injector paths the API server would call for a pod (Kubernetes adds the name label)."""
    ns_labels = {**ns_labels, "kubernetes.io/metadata.name": namespace}
    return [
        w["clientConfig"]["service"]["path"]
        for w in webhooks
        if _matches(w["namespaceSelector"], ns_labels) and _matches(w["objectSelector"], pod_labels)
    ]


def test_webhook_configuration_is_safe_by_default() -> None:
    docs = documents(render())
    config = one(docs, "MutatingWebhookConfiguration")
    assert len(config["webhooks"]) == 2
    for webhook in config["webhooks"]:
        assert webhook["failurePolicy"] == "Ignore" and webhook["sideEffects"] == "None"
        assert webhook["admissionReviewVersions"] == ["v1"] and webhook["timeoutSeconds"] <= 10
        assert webhook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert webhook["clientConfig"]["service"] == {
            **webhook["clientConfig"]["service"],
            "name": INJECTOR,
            "namespace": NAMESPACE,
            "port": 443,
        }
    fail = one(documents(render({"webhook": {"failurePolicy": "Fail"}})), "MutatingWebhookConfiguration")
    assert {w["failurePolicy"] for w in fail["webhooks"]} == {"Fail"}


OPT_IN = {"egress-sidecar.io/inject": "true"}
OPT_OUT = {"egress-sidecar.io/inject": "false"}


@pytest.mark.parametrize(
    ("namespace", "ns_labels", "pod_labels", "paths"),
    [
        ("shop", {}, {"app": "web"}, []),
        ("shop", {}, {**OPT_IN, "app": "web"}, ["/mutate"]),
        ("shop", OPT_IN, {"app": "web"}, ["/mutate/namespace"]),
        ("shop", OPT_IN, OPT_IN, ["/mutate/namespace"]),  # reviewed once, not twice
        ("shop", OPT_IN, OPT_OUT, []),
        ("kube-system", OPT_IN, OPT_IN, []),
    ],
)
def test_webhook_selectors_route_each_pod_to_at_most_one_entry(
    namespace: str, ns_labels: dict[str, str], pod_labels: dict[str, str], paths: list[str]
) -> None:
    webhooks = one(documents(render()), "MutatingWebhookConfiguration")["webhooks"]
    assert _called(webhooks, namespace, ns_labels, pod_labels) == paths


def test_injector_and_test_pods_are_never_injected_even_in_opted_in_namespace() -> None:
    docs = documents(render())
    webhooks = one(docs, "MutatingWebhookConfiguration")["webhooks"]
    injector_labels = one(docs, "Deployment", INJECTOR)["spec"]["template"]["metadata"]["labels"]
    test_labels = one(docs, "Pod")["metadata"]["labels"]
    for labels in (injector_labels, test_labels):
        assert _called(webhooks, NAMESPACE, OPT_IN, labels) == []


def test_generated_tls_is_a_ca_signed_serving_cert_for_the_service() -> None:
    docs = documents(render())
    secret = one(docs, "Secret", f"{RELEASE}-egress-sidecar-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert f"{INJECTOR}.{NAMESPACE}.svc" in names
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(base64.b64decode(secret["data"]["tls.key"]), password=None)
    assert (
        isinstance(key, rsa.RSAPrivateKey)
        and key.public_key().public_numbers() == cert.public_key().public_numbers()
    )
    bundles = {w["clientConfig"]["caBundle"] for w in one(docs, "MutatingWebhookConfiguration")["webhooks"]}
    assert bundles == {secret["data"]["ca.crt"]}
    deployment = one(docs, "Deployment", INJECTOR)
    assert {"name": "tls", "secret": {"secretName": secret["metadata"]["name"]}} in deployment["spec"][
        "template"
    ]["spec"]["volumes"]


def test_cert_manager_mode_uses_a_certificate_and_ca_injection() -> None:
    docs = documents(render(MODES["cert-manager"]))
    secret_name = f"{RELEASE}-egress-sidecar-webhook-tls"
    assert find(docs, "Secret") == []
    certificate = one(docs, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["spec"]["secretName"] == secret_name
    assert f"{INJECTOR}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    issuer = one(docs, "Issuer")
    assert issuer["spec"] == {"selfSigned": {}}
    assert certificate["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer"}
    config = one(docs, "MutatingWebhookConfiguration")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{secret_name}"
    assert all("caBundle" not in w["clientConfig"] for w in config["webhooks"])
    external = documents(render(MODES["cert-manager-issuer"]))
    assert find(external, "Issuer") == []
    assert one(external, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_podmonitor_is_opt_in_and_scrapes_injected_pods_admin_port() -> None:
    assert find(documents(render()), "PodMonitor") == []
    monitor = one(documents(render(MODES["podmonitor"])), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"] == {"matchLabels": {"egress-sidecar.io/injected": "true"}}
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "egress-admin", "path": "/metrics", "interval": "30s"}
    ]


def test_grafana_dashboard_config_map_carries_the_chart_dashboard() -> None:
    name = f"{RELEASE}-egress-sidecar-dashboard"
    assert not find(documents(render()), "ConfigMap", name)  # opt-in
    config_map = one(documents(render({"grafanaDashboard": {"enabled": True}})), "ConfigMap", name)
    validate(config_map)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    assert json.loads(config_map["data"]["egress-sidecar.json"]) == shipped
    graphs = [panel for panel in shipped["panels"] if panel["type"] != "row"]
    assert graphs and all(panel["targets"] and all(target["expr"] for target in panel["targets"]) for panel in graphs)


def test_static_only_mode_renders_no_webhook_but_keeps_the_config() -> None:
    docs = documents(render(MODES["static-only"]))
    assert {d["kind"] for d in docs} == {"ConfigMap"}


def test_helm_test_hook_posts_to_the_service_name_the_cert_covers() -> None:
    docs = documents(render())
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = test_pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "sidecar.inject.selftest"]
    assert f"--url=https://{INJECTOR}.{NAMESPACE}.svc/mutate" in command


# --- the sidecar config ConfigMap ------------------------------------------------------------------


def _config_maps(values: dict[str, Any]) -> dict[str, str]:
    return {
        d["metadata"]["namespace"]: d["data"]["config.yaml"]
        for d in find(documents(render(values)), "ConfigMap", "egress-sidecar-config")
    }


def test_default_config_map_carries_the_documented_default_config_verbatim() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "sidecar", "print-default-config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=30,
    ).stdout
    assert (CHART / "files" / "default.yaml").read_text() == printed
    assert _config_maps({}) == {NAMESPACE: printed}


def test_config_overrides_merge_and_pass_check_config_in_every_namespace(tmp_path: Path) -> None:
    maps = _config_maps(MODES["config-override"])
    assert set(maps) == {NAMESPACE, "shop", "billing"}
    merged = yaml.safe_load(maps["shop"])
    assert merged["policy"]["default"] == "deny" and merged["policy"]["allow_hosts"] == ["api.github.com"]
    assert merged["drain"]["grace"] == "20s"  # untouched defaults survive the merge
    path = tmp_path / "config.yaml"
    path.write_text(maps["shop"])
    check = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_policy_mode_value_sets_report_mode_over_the_config(tmp_path: Path) -> None:
    maps = _config_maps({"sidecar": {"policyMode": "report", "config": {"policy": {"default": "deny"}}}})
    merged = yaml.safe_load(maps[NAMESPACE])
    assert (merged["policy"]["mode"], merged["policy"]["default"]) == ("report", "deny")
    path = tmp_path / "config.yaml"
    path.write_text(maps[NAMESPACE])
    check = subprocess.run([sys.executable, "-m", "sidecar", "check-config", str(path)], capture_output=True,
                           text=True, cwd=REPO, timeout=30, check=False)
    assert check.returncode == 0, check.stderr


def test_notes_tell_the_next_step() -> None:
    notes = render()["egress-sidecar/templates/NOTES.txt"]
    assert "kubectl label namespace <NAMESPACE> egress-sidecar.io/inject=true" in notes
    assert "helm test es -n egress" in notes


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    docs = documents(render(values))
    data = one(docs, "ConfigMap", INJECTOR)["data"]["settings.yaml"]
    return yaml.safe_load(data)  # type: ignore[no-any-return]


@pytest.mark.parametrize("enabled", [False, True])
def test_lock_init_container_is_rendered_minimal_and_valid_lock_on_and_off(enabled: bool) -> None:
    settings = _settings({"sidecar": {"lock": {"enabled": enabled}}})
    assert settings["lock"]["enabled"] is enabled
    assert settings["metadataIdentity"] is False
    lock = settings["lock"]["container"]
    assert lock["name"] == "egress-sidecar-lock"
    assert lock["image"] == settings["container"]["image"]
    assert lock["args"] == ["lock", "--config", "/etc/egress-sidecar/config.yaml", "--uid", "65532"]
    security = lock["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == 0 and security["privileged"] is False  # root: see values.yaml
    assert set(lock["resources"]) == {"requests", "limits"}
    # The lock container is a valid init container of a Pod, for 1.29 and the newest schemas.
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
              "spec": {"initContainers": [lock], "containers": [{"name": "app", "image": "a"}]}})


def test_metadata_identity_in_the_sidecar_config_reaches_the_injector() -> None:
    assert _settings({"sidecar": {"config": {"policy": {"metadata": "identity"}}}})["metadataIdentity"] is True


def test_the_transparent_port_of_the_sidecar_config_reaches_the_injector() -> None:
    assert _settings({})["lock"]["transparentPort"] == 15006
    assert _settings({"sidecar": {"config": {"listen": {"transparent_port": 16006}}}})["lock"]["transparentPort"] == 16006


def test_lock_follows_the_sidecar_uid() -> None:
    settings = _settings({"sidecar": {"securityContext": {"runAsUser": 4242, "runAsNonRoot": True}}})
    assert settings["lock"]["container"]["args"][-2:] == ["--uid", "4242"]

