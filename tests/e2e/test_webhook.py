"""The real injector process over HTTPS: AdmissionReview v1 in, JSONPatch applied, Pod validated.

Settings come from rendering the Helm chart, as in a cluster; each patched Pod must validate
against the Kubernetes 1.29 and newest shipped schemas.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import pytest
import trustme

from sidecar.inject.review import pod_create_review
from tests.e2e.k8s_support import REPO, Injector, documents, injector_settings, render, run_injector, validate
from tests.unit import inject_data


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(directory / "tls.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    return directory / "tls.crt", directory / "tls.key", directory / "ca.crt", context


def _start(
    tmp: Path, tls: tuple[Path, Path, Path, ssl.SSLContext], values: dict[str, Any]
) -> Iterator[Injector]:
    settings = tmp / "settings.yaml"
    settings.write_text(injector_settings(documents(render(values))))
    with run_injector(settings, tls[0], tls[1], tls[3]) as injector:
        yield injector


@pytest.fixture(scope="module")
def injector(tmp_path_factory: pytest.TempPathFactory, tls: Any) -> Iterator[Injector]:
    yield from _start(tmp_path_factory.mktemp("native"), tls, {"sidecar": {"mode": "native"}})


@pytest.fixture(scope="module")
def fallback_injector(tmp_path_factory: pytest.TempPathFactory, tls: Any) -> Iterator[Injector]:
    yield from _start(tmp_path_factory.mktemp("fallback"), tls, {"sidecar": {"mode": "fallback"}})


def pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return inject_data.pod(labels, annotations, metadata={"generateName": "web-7d9f-", "namespace": "shop"},
                           containers=[{"name": "app", "image": "shop/web:1.4", "ports": [{"containerPort": 8080}]}])


def review(obj: dict[str, Any], uid: str = "0f9c2a6e-1") -> dict[str, Any]:
    request = pod_create_review(obj, uid, "shop")
    # What the API server adds beyond the minimum.
    request["request"].update({"userInfo": {"username": "system:serviceaccount"}, "oldObject": None, "dryRun": False})
    return request


def admit(
    injector: Injector, obj: dict[str, Any], path: str = "/mutate"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send the pod; return (AdmissionReview response, the pod with the patch applied)."""
    answer = injector.post(path, review(obj))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "0f9c2a6e-1"
    patched = copy.deepcopy(obj)
    if "patch" in response:
        assert response["patchType"] == "JSONPatch"
        patched = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))
    return response, patched


def sidecar_of(p: dict[str, Any]) -> dict[str, Any]:
    every = p["spec"].get("initContainers", []) + p["spec"]["containers"]
    found = [c for c in every if c["name"] == "egress-sidecar"]
    assert len(found) == 1
    return found[0]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


LABEL = {"egress-sidecar.io/inject": "true"}


def test_labelled_pod_gets_native_sidecar_that_validates(injector: Injector) -> None:
    response, patched = admit(injector, pod(LABEL, {"team": "shop"}))
    assert response["allowed"] is True
    validate(patched)
    sidecar = patched["spec"]["initContainers"][0]
    assert sidecar["name"] == "egress-sidecar" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "egress-admin"}
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert set(sidecar["resources"]) == {"requests", "limits"}
    assert patched["spec"]["volumes"] == [
        {"name": "egress-sidecar-config", "configMap": {"name": "egress-sidecar-config"}}
    ]
    annotations = patched["metadata"]["annotations"]
    assert annotations["team"] == "shop"
    assert (
        annotations["prometheus.io/scrape"],
        annotations["prometheus.io/port"],
        annotations["prometheus.io/path"],
    ) == ("true", "15090", "/metrics")
    assert patched["metadata"]["labels"]["egress-sidecar.io/injected"] == "true"
    assert patched["spec"]["containers"] == pod()["spec"]["containers"]  # the app is untouched


def test_already_injected_pod_gets_no_patch(injector: Injector) -> None:
    _, once = admit(injector, pod(LABEL))
    response, twice = admit(injector, once, "/mutate/namespace")
    assert "patch" not in response and twice == once


def test_namespace_opt_in_injects_pod_without_labels_or_annotations(injector: Injector) -> None:
    bare = pod()
    response, patched = admit(injector, bare, "/mutate/namespace")
    assert "patch" in response
    validate(patched)
    assert patched["spec"]["initContainers"][0]["name"] == "egress-sidecar"
    assert patched["metadata"]["annotations"]["egress-sidecar.io/status"] == "injected"


def test_unlabelled_pod_outside_opted_in_namespace_is_untouched(injector: Injector) -> None:
    response, patched = admit(injector, pod())
    assert response == {"uid": "0f9c2a6e-1", "allowed": True} and patched == pod()


def test_pod_label_false_opts_out_in_opted_in_namespace(injector: Injector) -> None:
    response, _ = admit(injector, pod({"egress-sidecar.io/inject": "false"}), "/mutate/namespace")
    assert response == {"uid": "0f9c2a6e-1", "allowed": True}


@pytest.mark.parametrize(
    ("annotation", "value", "check"),
    [
        (
            "image",
            "registry.example/egress-sidecar:0.2.0",
            lambda c, p: c["image"] == "registry.example/egress-sidecar:0.2.0",
        ),
        ("cpu-request", "250m", lambda c, p: c["resources"]["requests"]["cpu"] == "250m"),
        ("cpu-limit", "2", lambda c, p: c["resources"]["limits"]["cpu"] == "2"),
        ("memory-request", "96Mi", lambda c, p: c["resources"]["requests"]["memory"] == "96Mi"),
        ("memory-limit", "1Gi", lambda c, p: c["resources"]["limits"]["memory"] == "1Gi"),
        (
            "config-map",
            "shop-egress",
            lambda c, p: p["spec"]["volumes"][0]["configMap"]["name"] == "shop-egress",
        ),
        ("listen-port", "16001", lambda c, p: env(c)["EGRESS_LISTEN_PORT"] == "16001"),
        (
            "admin-port",
            "16090",
            lambda c, p: (
                env(c)["EGRESS_ADMIN_PORT"] == "16090"
                and c["ports"][0]["containerPort"] == 16090
                and p["metadata"]["annotations"]["prometheus.io/port"] == "16090"
            ),
        ),
        (
            "drain-grace",
            "50s",
            lambda c, p: (
                env(c)["EGRESS_DRAIN_GRACE"] == "50s" and p["spec"]["terminationGracePeriodSeconds"] == 55
            ),
        ),
    ],
)
def test_each_override_annotation_changes_the_injected_sidecar(
    injector: Injector, annotation: str, value: str, check: Any
) -> None:
    response, patched = admit(injector, pod(LABEL, {f"egress-sidecar.io/{annotation}": value}))
    assert response["allowed"] is True and "warnings" not in response
    validate(patched)
    assert check(sidecar_of(patched), patched)


def test_set_proxy_env_sets_http_proxy_https_proxy_and_no_proxy_in_app_containers(injector: Injector) -> None:
    annotations = {
        "egress-sidecar.io/set-proxy-env": "true",
        "egress-sidecar.io/no-proxy": "db.shop,10.1.2.3",
    }
    _, patched = admit(injector, pod(LABEL, annotations))
    validate(patched)
    app = env(patched["spec"]["containers"][0])
    assert app["HTTP_PROXY"] == app["http_proxy"] == "http://127.0.0.1:15001"
    assert app["NO_PROXY"] == app["no_proxy"] == "localhost,127.0.0.1,.svc,.cluster.local,db.shop,10.1.2.3"
    assert app["HTTPS_PROXY"] == app["https_proxy"] == "http://127.0.0.1:15001"


def test_bad_override_is_refused_with_the_annotation_named(injector: Injector) -> None:
    response, patched = admit(injector, pod(LABEL, {"egress-sidecar.io/admin-port": "8080"}))
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert "8080 is already used by container 'app'" in response["status"]["message"]
    assert patched == pod(LABEL, {"egress-sidecar.io/admin-port": "8080"})


def test_fallback_mode_injects_first_container_with_post_start_wait(fallback_injector: Injector) -> None:
    _, patched = admit(fallback_injector, pod(LABEL))
    validate(patched)
    assert "initContainers" not in patched["spec"]
    first = patched["spec"]["containers"][0]
    assert first["name"] == "egress-sidecar" and "restartPolicy" not in first
    assert first["lifecycle"]["postStart"]["exec"]["command"][:3] == [
        "python",
        "-m",
        "sidecar.inject.waitready",
    ]
    assert first["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert patched["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


@pytest.mark.parametrize(
    "body", [b'{"apiVersion": ', b"\x00\x01binary", b"null", json.dumps({"kind": "Pod"}).encode()]
)
def test_malformed_bodies_get_400_with_error_header(injector: Injector, body: bytes) -> None:
    answer = injector.post("/mutate", body)
    assert answer.status_code == 400 and answer.headers["x-egress-error"] == "bad_request"
    assert answer.text.count("\n") == 1
    assert injector.get("/healthz").status_code == 200  # still serving


def test_wrong_kind_is_allowed_unchanged_with_a_warning(injector: Injector) -> None:
    body = review({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "labels": LABEL}})
    body["request"]["kind"] = {"group": "", "version": "v1", "kind": "ConfigMap"}
    answer = injector.post("/mutate", body).json()["response"]
    assert (
        answer["allowed"] is True
        and "patch" not in answer
        and "only handles v1 Pods" in answer["warnings"][0]
    )


def test_routes_methods_and_metrics(injector: Injector) -> None:
    assert injector.get("/mutate").status_code == 405
    missing = injector.post("/validate", review(pod()))
    assert missing.status_code == 404 and missing.headers["x-egress-error"] == "no_route"
    before = _count(injector, "injected")
    admit(injector, pod(LABEL))
    assert _count(injector, "injected") == before + 1
    bad_before = _count(injector, "bad_request")
    assert injector.post("/mutate", b"not json").status_code == 400
    assert _count(injector, "bad_request") == bad_before + 1
    lint = subprocess.run(
        ["promtool", "check", "metrics"],
        input=injector.get("/metrics").text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _count(injector: Injector, outcome: str) -> float:
    for line in injector.get("/metrics").text.splitlines():
        if line.startswith(f'egress_injector_reviews_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no egress_injector_reviews_total for {outcome}")


def test_each_admission_is_one_json_log_line_with_outcome(injector: Injector) -> None:
    body = review(pod(LABEL), uid="log-line-uid")
    body["request"]["object"]["metadata"]["generateName"] = "logged-"
    assert injector.post("/mutate", body).status_code == 200
    event = injector.log.wait_for(lambda e: e.get("event") == "admission" and e.get("pod") == "shop/logged-")
    assert (event["outcome"], event["detail"], event["path"], event["level"]) == (
        "injected",
        "injected",
        "/mutate",
        "info",
    )


def test_helm_test_selftest_passes_against_the_injector_and_fails_on_wrong_ca(
    injector: Injector, tls: Any, tmp_path: Path
) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "sidecar.inject.selftest", f"--url={injector.url}/mutate", f"--ca={tls[2]}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    other_ca = tmp_path / "other.crt"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    bad = subprocess.run(
        [sys.executable, "-m", "sidecar.inject.selftest", f"--url={injector.url}/mutate", f"--ca={other_ca}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "FAIL" in bad.stderr


def test_renewed_certificate_is_served_without_restart(tmp_path: Path) -> None:
    """cert-manager renews the Secret in place: new handshakes must get the new certificate."""
    first, second = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"

    def install(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1")
        # Like the kubelet's atomic writer: new files, then rename over the old names.
        issued.private_key_pem.write_to_path(str(tmp_path / "new.key"))
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / "new.crt"))
        (tmp_path / "new.key").rename(key)
        (tmp_path / "new.crt").rename(cert)

    install(first)
    trusts_first, trusts_second = ssl.create_default_context(), ssl.create_default_context()
    first.configure_trust(trusts_first)
    second.configure_trust(trusts_second)
    settings = tmp_path / "settings.yaml"
    settings.write_text(injector_settings(documents(render())))
    with run_injector(settings, cert, key, trusts_first) as injector:
        install(second)
        assert injector.get("/healthz").status_code == 200  # a probe on a new connection: old cert still
        injector.log.wait_for(lambda e: e.get("event") == "inject.certificate_reloaded")
        injector.ca = trusts_second
        assert injector.get("/healthz").status_code == 200
        injector.ca = trusts_first
        with pytest.raises(httpx.ConnectError):
            injector.get("/healthz")


def test_sigterm_stops_the_injector_cleanly(tmp_path: Path, tls: Any) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(injector_settings(documents(render())))
    with run_injector(settings, tls[0], tls[1], tls[3]) as injector:
        process = injector.process
    assert process.returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--settings FILE is required"),
        (["--settings", "/nonexistent/settings.yaml"], "cannot read settings file"),
        (["--settings", "{settings}", "--cert", "{settings}"], "cannot load TLS certificate"),
    ],
)
def test_start_up_errors_are_one_clear_line_and_exit_2(
    tmp_path: Path, tls: Any, args: list[str], message: str
) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(injector_settings(documents(render())))
    argv = ["--cert", str(tls[0]), "--key", str(tls[1]), "--host", "127.0.0.1", "--port", "0"]
    argv += [a.format(settings=settings) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_oversized_body_is_refused_with_413(injector: Injector) -> None:
    answer = injector.post("/mutate", b"{" + b" " * (5 * 1024 * 1024) + b"}")
    assert answer.status_code == 413 and answer.headers["x-egress-error"] == "bad_request"
    assert injector.get("/healthz").status_code == 200


@pytest.fixture(scope="module")
def lock_injectors(tmp_path_factory: pytest.TempPathFactory, tls: Any) -> Iterator[dict[str, Injector]]:
    """Injectors whose chart turns the egress lock on by default, native and fallback."""
    with contextlib.ExitStack() as stack:
        started = {}
        for mode in ("native", "fallback"):
            starting = _start(tmp_path_factory.mktemp(f"lock-{mode}"), tls,
                              {"sidecar": {"mode": mode, "lock": {"enabled": True}}})
            started[mode] = stack.enter_context(contextlib.contextmanager(lambda s=starting: s)())
        yield started


@pytest.mark.parametrize("mode", ["native", "fallback"])
def test_locked_pod_gets_the_lock_init_container_first_and_validates(
    lock_injectors: dict[str, Injector], mode: str
) -> None:
    app_init = {"name": "migrate", "image": "shop/migrate:1"}
    obj = pod(LABEL)
    obj["spec"]["initContainers"] = [app_init]
    _, patched = admit(lock_injectors[mode], obj)
    validate(patched)
    inits = [c["name"] for c in patched["spec"]["initContainers"]]
    expected = ["egress-sidecar-lock", "egress-sidecar", "migrate"] if mode == "native" else [
        "egress-sidecar-lock", "migrate"]
    assert inits == expected
    lock = patched["spec"]["initContainers"][0]
    assert lock["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert "restartPolicy" not in lock  # runs to completion, before everything else


def test_lock_annotation_false_leaves_the_pod_as_without_the_lock(
    lock_injectors: dict[str, Injector], injector: Injector
) -> None:
    _, unlocked = admit(lock_injectors["native"], pod(LABEL, {"egress-sidecar.io/lock": "false"}))
    _, plain = admit(injector, pod(LABEL, {"egress-sidecar.io/lock": "false"}))
    assert unlocked == plain
    _, default = admit(injector, pod(LABEL))
    assert [c["name"] for c in default["spec"]["initContainers"]] == ["egress-sidecar"]
    _, asked = admit(injector, pod(LABEL, {"egress-sidecar.io/lock": "true"}))
    validate(asked)
    assert [c["name"] for c in asked["spec"]["initContainers"]] == ["egress-sidecar-lock", "egress-sidecar"]

