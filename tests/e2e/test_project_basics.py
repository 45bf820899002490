"""Project basics a newcomer checks first: --version, the licence, the changelog, a wheel that
builds without deprecation banners, and a chart README whose values table matches values.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

import sidecar
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "helm_values_table.py"
CHART = ROOT / "helm" / "egress-sidecar"


def test_version_flag_prints_the_package_version() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert (result.returncode, result.stdout.strip()) == (0, f"egress-sidecar {sidecar.__version__}")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == sidecar.__version__


def test_license_file_matches_pyproject_and_changelog_names_this_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX string, not the deprecated table
    assert project["project"]["license-files"] == ["LICENSE"]
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {sidecar.__version__} - " in changelog and "## Unreleased" in changelog


def _docker_build_context(target: Path) -> None:
    """What the Dockerfile's build stage copies from the context (the COPY lines without --from)."""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        parts = line.split()
        if not parts or parts[0] != "COPY" or any(p.startswith("--") for p in parts):
            continue
        *sources, destination = parts[1:]
        for source in sources:
            into = target / source if destination.endswith("/") else target / destination
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / source, into)


def test_wheel_builds_from_the_docker_context_without_a_deprecation_banner(tmp_path: Path) -> None:
    source, wheels = tmp_path / "src", tmp_path / "wheels"
    source.mkdir()
    _docker_build_context(source)
    assert (source / "LICENSE").exists() and (source / "sidecar" / "cli.py").exists()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "deprecated" not in output.lower() and "SetuptoolsDeprecationWarning" not in output, output
    with zipfile.ZipFile(next(wheels.glob("egress_sidecar-*.whl"))) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_chart_readme_values_table_matches_values_yaml() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_values_table_check_fails_when_values_yaml_changes(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("# -- Scrape interval.", "# -- How often Prometheus scrapes."))
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", "--chart", str(chart)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "out of date" in result.stderr
    subprocess.run([sys.executable, str(SCRIPT), "--chart", str(chart)], check=True, timeout=60)
    assert "| `podMonitor.interval` | string | `\"30s\"` | How often Prometheus scrapes. |" in (
        chart / "README.md").read_text()


def _paths(node: object, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        found.append(path)
        found += _paths(value, path + ".")
    return found


def test_every_value_is_documented_by_itself_or_its_parent() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from helm_values_table import documented_keys
    finally:
        sys.path.remove(str(SCRIPT.parent))
    text = (CHART / "values.yaml").read_text()
    documented = {path for path, _ in documented_keys(text)}
    for path in _paths(yaml.safe_load(text)):
        parts = path.split(".")
        ancestors = {".".join(parts[:i]) for i in range(1, len(parts))}
        section = any(other.startswith(path + ".") for other in documented)
        if path not in documented and not (ancestors & documented) and not section:
            pytest.fail(f"values.yaml key {path} has no `# -- ` comment (nor a documented parent)")
