"""Interception trust injection: the CA volume, read-only mounts and trust variables in app containers. Pure."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from sidecar.inject import settings as settings_module
from sidecar.inject.overrides import InjectError
from sidecar.inject.patch import TRUST_ENV_NAMES, pod_patch
from tests.unit.inject_data import RAW_SETTINGS, make_settings, pod

CA_DIR = "/var/run/egress-sidecar/ca"
BUNDLE = CA_DIR + "/bundle.pem"
OPTED_IN = {"egress-sidecar.io/inject": "true"}
CA_VOLUME = {"name": "egress-sidecar-ca", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}}


def intercepting() -> settings_module.Settings:
    raw = copy.deepcopy(RAW_SETTINGS)
    raw["container"]["volumeMounts"].append({"name": "egress-sidecar-ca", "mountPath": CA_DIR})
    raw["intercept"] = {"caDir": CA_DIR, "volume": CA_VOLUME}
    return settings_module.from_mapping(raw)


def apply(p: dict[str, Any], settings: settings_module.Settings) -> dict[str, Any]:
    return jsonpatch.apply_patch(p, pod_patch(p, settings, namespace_opted_in=False).patch)  # type: ignore[no-any-return]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_with_interception_every_app_container_trusts_the_bundle_read_only() -> None:
    apps = [{"name": "app", "image": "a:1", "env": [{"name": "SSL_CERT_FILE", "value": "/etc/own.pem"},
                                                  {"name": "KEEP", "value": "1"}]},
            {"name": "worker", "image": "w:1", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
    out = apply(pod(OPTED_IN, containers=apps, volumes=[{"name": "data", "emptyDir": {}}]), intercepting())
    assert out["spec"]["volumes"][-1] == CA_VOLUME
    for container in out["spec"]["containers"]:
        assert {name: env(container)[name] for name in TRUST_ENV_NAMES} == dict.fromkeys(TRUST_ENV_NAMES, BUNDLE)
        assert container["volumeMounts"][-1] == {"name": "egress-sidecar-ca", "mountPath": CA_DIR, "readOnly": True}
    assert env(out["spec"]["containers"][0])["KEEP"] == "1"
    assert [e["name"] for e in out["spec"]["containers"][0]["env"]].count("SSL_CERT_FILE") == 1
    sidecar = out["spec"]["initContainers"][0]
    assert {"name": "egress-sidecar-ca", "mountPath": CA_DIR} in sidecar["volumeMounts"]  # writable for the sidecar


def test_without_interception_app_containers_get_no_trust_variables_or_mounts() -> None:
    out = apply(pod(OPTED_IN), make_settings())
    assert out["spec"]["containers"] == pod()["spec"]["containers"]
    assert [v["name"] for v in out["spec"]["volumes"]] == ["egress-sidecar-config"]


def test_the_set_trust_env_annotation_opts_a_pod_out_of_the_variables_not_the_mount() -> None:
    out = apply(pod(OPTED_IN, {"egress-sidecar.io/set-trust-env": "false"}), intercepting())
    app = out["spec"]["containers"][0]
    assert not set(TRUST_ENV_NAMES) & set(env(app))
    assert app["volumeMounts"] == [{"name": "egress-sidecar-ca", "mountPath": CA_DIR, "readOnly": True}]


def test_proxy_and_trust_variables_come_together_in_one_env_list() -> None:
    out = apply(pod(OPTED_IN, {"egress-sidecar.io/set-proxy-env": "true"}), intercepting())
    names = [e["name"] for e in out["spec"]["containers"][0]["env"]]
    assert names[:2] == ["HTTP_PROXY", "http_proxy"] and names[-5:] == list(TRUST_ENV_NAMES)


@pytest.mark.parametrize("spec", [
    {"volumes": [{"name": "egress-sidecar-ca", "emptyDir": {}}]},
    {"containers": [{"name": "app", "image": "a", "volumeMounts": [{"name": "x", "mountPath": CA_DIR + "/"}]}]},
])
def test_clashes_with_the_ca_volume_or_path_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(InjectError, match="egress-sidecar-ca|interception CA"):
        pod_patch(pod(OPTED_IN, **spec), intercepting(), namespace_opted_in=False)


@pytest.mark.parametrize("bad", [{"caDir": "relative", "volume": CA_VOLUME}, {"caDir": CA_DIR}, "yes"])
def test_bad_intercept_settings_are_refused_by_key(bad: Any) -> None:
    raw = copy.deepcopy(RAW_SETTINGS)
    raw["intercept"] = bad
    with pytest.raises(settings_module.SettingsError, match="intercept"):
        settings_module.from_mapping(raw)


def test_a_bad_set_trust_env_value_names_the_annotation() -> None:
    with pytest.raises(InjectError, match="set-trust-env"):
        pod_patch(pod(OPTED_IN, {"egress-sidecar.io/set-trust-env": "no"}), intercepting(), namespace_opted_in=False)
