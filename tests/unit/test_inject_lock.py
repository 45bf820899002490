"""The egress lock in the webhook's patch (pure): where the init container goes, when, and NO_PROXY."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from sidecar.inject import settings as settings_module
from sidecar.inject.overrides import InjectError
from sidecar.inject.patch import pod_patch
from sidecar.policy import metadata
from tests.unit.inject_data import RAW_SETTINGS, pod

LOCK_CONTAINER: dict[str, Any] = {
    "name": "egress-sidecar-lock",
    "image": "egress-sidecar:0.1.0",
    "args": ["lock", "--config", "/etc/egress-sidecar/config.yaml", "--uid", "65532"],
    "securityContext": {"runAsUser": 0, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}},
}
OPTED_IN = {"egress-sidecar.io/inject": "true"}


def settings(*, native: bool = True, enabled: bool = False, identity: bool = False) -> settings_module.Settings:
    raw = copy.deepcopy(RAW_SETTINGS)
    if not native:
        del raw["container"]["restartPolicy"]
    raw["lock"] = {"enabled": enabled, "container": LOCK_CONTAINER}
    raw["metadataIdentity"] = identity
    return settings_module.from_mapping(raw)


def patched(p: dict[str, Any], s: settings_module.Settings) -> dict[str, Any]:
    return jsonpatch.apply_patch(p, pod_patch(p, s, namespace_opted_in=False).patch)  # type: ignore[no-any-return]


def names(p: dict[str, Any], key: str) -> list[str]:
    return [c["name"] for c in p["spec"].get(key, [])]


def test_a_pod_without_the_lock_is_unchanged_by_it() -> None:
    out = patched(pod(OPTED_IN, initContainers=[{"name": "migrate", "image": "m:1"}]), settings())
    assert names(out, "initContainers") == ["egress-sidecar", "migrate"]


@pytest.mark.parametrize("native", [True, False])
def test_chart_default_puts_the_lock_first_before_the_native_sidecar(native: bool) -> None:
    out = patched(pod(OPTED_IN, initContainers=[{"name": "migrate", "image": "m:1"}]),
                  settings(native=native, enabled=True))
    if native:
        assert names(out, "initContainers") == ["egress-sidecar-lock", "egress-sidecar", "migrate"]
    else:
        assert names(out, "initContainers") == ["egress-sidecar-lock", "migrate"]
        assert names(out, "containers") == ["egress-sidecar", "app"]
    assert out["spec"]["initContainers"][0] == LOCK_CONTAINER


@pytest.mark.parametrize("native", [True, False])
def test_the_annotation_turns_the_lock_on_and_off_per_pod(native: bool) -> None:
    on = patched(pod({**OPTED_IN}, {"egress-sidecar.io/lock": "true"}), settings(native=native))
    assert names(on, "initContainers")[0] == "egress-sidecar-lock"
    off = patched(pod(OPTED_IN, {"egress-sidecar.io/lock": "false"}), settings(native=native, enabled=True))
    assert "egress-sidecar-lock" not in names(off, "initContainers")


def test_bad_lock_annotation_is_refused_by_name() -> None:
    with pytest.raises(InjectError, match="egress-sidecar.io/lock"):
        pod_patch(pod(OPTED_IN, {"egress-sidecar.io/lock": "yes"}), settings(), namespace_opted_in=False)


def _no_proxy(out: dict[str, Any]) -> str:
    return next(e["value"] for e in out["spec"]["containers"][-1]["env"] if e["name"] == "NO_PROXY")


@pytest.mark.parametrize(("identity", "lock", "has_metadata"), [
    (True, "false", True), (True, "true", False), (False, "false", False), (False, "true", False)])
def test_no_proxy_gets_metadata_addresses_only_without_lock_and_with_identity(
    identity: bool, lock: str, has_metadata: bool
) -> None:
    annotations = {"egress-sidecar.io/set-proxy-env": "true", "egress-sidecar.io/lock": lock}
    value = _no_proxy(patched(pod(OPTED_IN, annotations), settings(identity=identity)))
    assert ("169.254.169.254" in value.split(",")) == has_metadata
    if has_metadata:
        assert set(metadata.NO_PROXY_ENTRIES) <= set(value.split(","))


def test_a_locked_pod_whose_app_declares_the_transparent_port_is_refused() -> None:
    app = {"name": "app", "image": "a", "ports": [{"containerPort": 15006}]}
    with pytest.raises(InjectError, match="15006 is the egress lock's transparent listener"):
        pod_patch(pod(OPTED_IN, {"egress-sidecar.io/lock": "true"}, containers=[app]), settings(),
                  namespace_opted_in=False)
    unlocked = pod_patch(pod(OPTED_IN, containers=[app]), settings(), namespace_opted_in=False)
    assert unlocked.reason == "injected"
