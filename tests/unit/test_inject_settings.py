"""Injector settings: what the chart renders is validated once, errors name the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from sidecar.inject import settings as settings_module
from sidecar.inject.settings import SettingsError
from tests.unit.inject_data import RAW_SETTINGS


def raw(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(RAW_SETTINGS)
    data.update(changes)
    return data


def test_ports_and_grace_are_read_back_from_the_rendered_env() -> None:
    s = settings_module.from_mapping(raw())
    assert (s.listen_port, s.admin_port, s.drain_grace, s.native) == (15001, 15090, 20.0, True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"container": None}, "`container` must be a container spec"),
        ({"volume": {"name": "x", "emptyDir": {}}}, "configMap volume"),
        ({"noProxy": "localhost"}, "`noProxy`"),
        ({"prometheusAnnotations": "yes"}, "`prometheusAnnotations`"),
    ],
)
def test_bad_settings_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings_module.from_mapping(raw(**change))


def test_container_without_port_env_is_refused() -> None:
    data = raw()
    data["container"]["env"] = [e for e in data["container"]["env"] if e["name"] != "EGRESS_ADMIN_PORT"]
    with pytest.raises(SettingsError, match="EGRESS_ADMIN_PORT"):
        settings_module.from_mapping(data)


def test_unreadable_and_non_yaml_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        settings_module.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("container: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        settings_module.load(bad)
