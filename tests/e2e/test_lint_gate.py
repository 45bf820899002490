"""`make lint` is a gate: it passes on the tree and fails on a planted ruff or mypy error.

It runs on a copy of the tree (never the checkout itself) with the venv running the tests:
`VENV=` points make at it and `-o` tells make not to reinstall the lint extra into it
from the copy (which would move the editable install to a temporary directory).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

_TREE = ("sidecar", "tests", "bench", "pyproject.toml", "Makefile")


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("lint") / "tree"
    target.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", ".mypy_cache", ".ruff_cache", "results", ".work")
    for name in _TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target


def make_lint(tree: Path) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.prefix)
    return subprocess.run(
        ["make", "-C", str(tree), f"VENV={venv}", "-o", str(venv / ".lint-installed"), "lint"],
        capture_output=True, text=True, timeout=300,
    )


def test_make_lint_passes_on_the_tree_and_fails_on_planted_errors(copy: Path) -> None:
    clean = make_lint(copy)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ruff check" in clean.stdout and "mypy" in clean.stdout

    module = copy / "sidecar" / "errors.py"
    original = module.read_text()

    # An unused import: ruff (pyflakes F401) must fail the target.
    module.write_text("import os\n" + original)
    result = make_lint(copy)
    assert result.returncode != 0
    assert "F401" in result.stdout + result.stderr

    # A function without annotations: ruff is content, mypy --strict must fail the target.
    module.write_text(original + "\n\ndef planted(value):\n    return value\n")
    result = make_lint(copy)
    assert result.returncode != 0
    assert "sidecar/errors.py" in result.stdout and "no-untyped-def" in result.stdout, result.stdout + result.stderr

    module.write_text(original)
