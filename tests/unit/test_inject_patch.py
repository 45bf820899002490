"""The pure pod -> JSONPatch function: opt-in, idempotence, overrides, odd pod shapes."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from sidecar.inject import settings as settings_module
from sidecar.inject.overrides import InjectError
from sidecar.inject.patch import pod_patch, pointer, proxy_env
from tests.unit.inject_data import CONTAINER, make_settings, pod
from tests.unit.inject_data import RAW_SETTINGS as RAW

NATIVE = make_settings()


OPTED_IN = {"egress-sidecar.io/inject": "true"}


def patched(
    p: dict[str, Any], settings: settings_module.Settings = NATIVE, ns: bool = False
) -> dict[str, Any]:
    result = pod_patch(p, settings, namespace_opted_in=ns)
    return jsonpatch.apply_patch(p, result.patch)  # type: ignore[no-any-return]


def sidecar(p: dict[str, Any]) -> dict[str, Any]:
    return next(
        c
        for c in p["spec"].get("initContainers", []) + p["spec"]["containers"]
        if c["name"] == "egress-sidecar"
    )


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_labelled_pod_gets_native_sidecar_first_in_init_containers() -> None:
    p = pod(OPTED_IN, initContainers=[{"name": "migrate", "image": "m:1"}])
    out = patched(p)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["egress-sidecar", "migrate"]
    assert out["spec"]["initContainers"][0] == CONTAINER
    assert out["spec"]["volumes"] == [RAW["volume"]]
    assert out["metadata"]["labels"]["egress-sidecar.io/injected"] == "true"
    assert out["metadata"]["annotations"]["egress-sidecar.io/status"] == "injected"


def test_pod_without_labels_annotations_or_init_containers_gets_parents_created() -> None:
    p = pod(None, None)
    assert pod_patch(p, NATIVE, namespace_opted_in=False).patch == []
    out = patched(p, ns=True)
    assert out["spec"]["initContainers"][0]["name"] == "egress-sidecar"
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "15090"
    assert out["metadata"]["labels"] == {"egress-sidecar.io/injected": "true"}


def test_pod_without_metadata_at_all_is_patched() -> None:
    p = {"spec": {"containers": [{"name": "app", "image": "a"}]}}
    out = patched(p, ns=True)
    assert out["metadata"]["annotations"]["egress-sidecar.io/status"] == "injected"


def test_unlabelled_pod_in_plain_namespace_is_left_alone() -> None:
    result = pod_patch(pod({"app": "web"}), NATIVE, namespace_opted_in=False)
    assert (result.patch, result.reason) == ([], "not-opted-in")


def test_pod_label_false_opts_out_even_in_opted_in_namespace() -> None:
    result = pod_patch(pod({"egress-sidecar.io/inject": "false"}), NATIVE, namespace_opted_in=True)
    assert (result.patch, result.reason) == ([], "opted-out")


def test_injected_pod_gets_empty_patch_on_second_pass() -> None:
    once = patched(pod(OPTED_IN))
    result = pod_patch(once, NATIVE, namespace_opted_in=True)
    assert (result.patch, result.reason) == ([], "already-injected")


def test_host_network_pod_is_skipped_with_a_warning() -> None:
    result = pod_patch(pod(OPTED_IN, hostNetwork=True), NATIVE, namespace_opted_in=False)
    assert result.patch == [] and result.reason == "host-network" and "hostNetwork" in result.warnings[0]


def test_statically_injected_pod_is_not_injected_again() -> None:
    p = pod(OPTED_IN, initContainers=[copy.deepcopy(CONTAINER)])
    assert pod_patch(p, NATIVE, namespace_opted_in=False).reason == "already-injected"


def test_fallback_mode_puts_sidecar_first_among_containers_and_keeps_kubectl_on_app() -> None:
    out = patched(pod(OPTED_IN), make_settings(native=False))
    assert [c["name"] for c in out["spec"]["containers"]] == ["egress-sidecar", "app"]
    assert "initContainers" not in out["spec"]
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


@pytest.mark.parametrize("policy", ["Never", "OnFailure"])
def test_job_pods_are_skipped_in_fallback_mode_but_injected_natively(policy: str) -> None:
    skipped = pod_patch(
        pod(OPTED_IN, restartPolicy=policy), make_settings(native=False), namespace_opted_in=False
    )
    assert skipped.patch == [] and skipped.reason == "run-to-completion" and "Jobs" in skipped.warnings[0]
    assert (
        pod_patch(pod(OPTED_IN, restartPolicy=policy), NATIVE, namespace_opted_in=False).reason == "injected"
    )


def test_overrides_change_image_resources_ports_grace_and_config_map() -> None:
    annotations = {
        "egress-sidecar.io/image": "registry.example/egress:2",
        "egress-sidecar.io/cpu-request": "100m",
        "egress-sidecar.io/memory-limit": "256Mi",
        "egress-sidecar.io/listen-port": "16001",
        "egress-sidecar.io/admin-port": "16090",
        "egress-sidecar.io/drain-grace": "45s",
        "egress-sidecar.io/config-map": "team-egress",
    }
    out = patched(pod(OPTED_IN, annotations))
    c = sidecar(out)
    assert c["image"] == "registry.example/egress:2"
    assert c["resources"] == {
        "requests": {"cpu": "100m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert env(c) == {
        "EGRESS_LISTEN_PORT": "16001",
        "EGRESS_ADMIN_PORT": "16090",
        "EGRESS_DRAIN_GRACE": "45s",
    }
    assert c["ports"][0]["containerPort"] == 16090
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "16090"
    assert out["spec"]["volumes"][0]["configMap"]["name"] == "team-egress"
    assert out["spec"]["terminationGracePeriodSeconds"] == 50  # 45s drain + 5s headroom
    assert NATIVE.container["image"] == "egress-sidecar:0.1.0"  # settings were not mutated


def test_fallback_pre_stop_delay_counts_towards_the_termination_period() -> None:
    raw = copy.deepcopy(RAW)
    del raw["container"]["restartPolicy"]
    raw["container"]["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    fallback = settings_module.from_mapping(raw)
    assert fallback.pre_stop_seconds == 5.0
    assert "terminationGracePeriodSeconds" not in patched(pod(OPTED_IN), fallback)["spec"]  # 5 + 20 + 5 = 30
    out = patched(pod(OPTED_IN, {"egress-sidecar.io/drain-grace": "40s"}), fallback)
    assert out["spec"]["terminationGracePeriodSeconds"] == 50


def test_default_grace_fits_default_termination_period() -> None:
    assert "terminationGracePeriodSeconds" not in patched(pod(OPTED_IN))["spec"]


def test_set_proxy_env_gives_app_containers_http_proxy_https_proxy_and_no_proxy() -> None:
    annotations = {
        "egress-sidecar.io/set-proxy-env": "true",
        "egress-sidecar.io/no-proxy": "db.internal, 10.0.0.0/8",
        "egress-sidecar.io/listen-port": "16001",
    }
    p = pod(OPTED_IN, annotations)
    p["spec"]["containers"].append(
        {
            "name": "worker",
            "image": "w",
            "env": [
                {"name": "KEEP", "value": "1"},
                {"name": "HTTP_PROXY", "value": "http://old:3128"},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
        }
    )
    out = patched(p)
    for container in out["spec"]["containers"]:
        e = env(container)
        assert e["HTTP_PROXY"] == e["http_proxy"] == "http://127.0.0.1:16001"
        assert (
            e["NO_PROXY"] == e["no_proxy"] == "localhost,127.0.0.1,.svc,.cluster.local,db.internal,10.0.0.0/8"
        )
        assert e["HTTPS_PROXY"] == e["https_proxy"] == "http://127.0.0.1:16001"
    worker = out["spec"]["containers"][1]
    assert [x["name"] for x in worker["env"]][:2] == ["KEEP", "SECRET"]
    assert "HTTP_PROXY" not in env(sidecar(out))


def test_set_https_proxy_false_sets_http_proxy_only_and_keeps_the_apps_own() -> None:
    annotations = {"egress-sidecar.io/set-proxy-env": "true", "egress-sidecar.io/set-https-proxy": "false"}
    p = pod(OPTED_IN, annotations)
    p["spec"]["containers"][0]["env"] = [{"name": "HTTPS_PROXY", "value": "http://corp:3128"}]
    e = env(patched(p)["spec"]["containers"][0])
    assert e["HTTP_PROXY"] == "http://127.0.0.1:15001"
    assert e["HTTPS_PROXY"] == "http://corp:3128" and "https_proxy" not in e


def test_proxy_env_without_annotation_leaves_app_env_alone() -> None:
    out = patched(pod(OPTED_IN))
    assert "env" not in out["spec"]["containers"][0]


def test_app_scrape_annotations_are_not_overwritten() -> None:
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}
    out = patched(pod(OPTED_IN, annotations))
    assert out["metadata"]["annotations"]["prometheus.io/port"] == "8080"


def test_port_clash_with_app_container_is_refused_with_the_annotation_to_use() -> None:
    p = pod(OPTED_IN)
    p["spec"]["containers"][0]["ports"] = [{"containerPort": 15090}]
    with pytest.raises(InjectError, match="egress-sidecar.io/admin-port"):
        pod_patch(p, NATIVE, namespace_opted_in=False)


def test_equal_listen_and_admin_ports_are_refused() -> None:
    with pytest.raises(InjectError, match="both 15090"):
        pod_patch(pod(OPTED_IN, {"egress-sidecar.io/listen-port": "15090"}), NATIVE, namespace_opted_in=False)


@pytest.mark.parametrize("spec", [{"containers": "app"}, {"containers": [1]}, {"initContainers": {"a": 1}}])
def test_odd_container_shapes_are_refused_not_crashed(spec: dict[str, Any]) -> None:
    p = pod(OPTED_IN)
    p["spec"].update(spec)
    with pytest.raises(InjectError, match="must be a list of containers"):
        pod_patch(p, NATIVE, namespace_opted_in=False)


def test_pod_without_spec_is_refused() -> None:
    with pytest.raises(InjectError, match="no spec"):
        pod_patch({"metadata": {"labels": OPTED_IN}}, NATIVE, namespace_opted_in=False)


def test_annotation_keys_with_slash_and_tilde_are_escaped() -> None:
    assert pointer("metadata", "annotations", "a/b~c") == "/metadata/annotations/a~1b~0c"


def test_proxy_env_drops_duplicate_no_proxy_entries() -> None:
    assert proxy_env(1, ("a", "b", "a"))[4] == {"name": "NO_PROXY", "value": "a,b"}
