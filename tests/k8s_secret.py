"""A Kubernetes Secret volume on disk, and its rotation, exactly as the kubelet does them.

The kubelet's AtomicWriter (kubernetes/pkg/volume/util/atomic_writer.go) writes the files
into a new `..<timestamp>` directory, points a temporary `..data_tmp` symlink at it, renames
that over `..data` (atomic), and keeps `name -> ..data/name` links at the top.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

_generation = itertools.count()


def _write_generation(volume: Path, files: dict[str, str]) -> str:
    name = f"..2026_11_25_18_00_00.{next(_generation):09d}"
    directory = volume / name
    directory.mkdir()
    for filename, content in files.items():
        (directory / filename).write_text(content)
    return name


def create_secret_volume(volume: Path, files: dict[str, str]) -> None:
    """A fresh secret volume holding `files`."""
    volume.mkdir(parents=True, exist_ok=True)
    generation = _write_generation(volume, files)
    os.symlink(generation, volume / "..data")
    for filename in files:
        os.symlink(f"..data/{filename}", volume / filename)


def rotate_secret_volume(volume: Path, files: dict[str, str]) -> None:
    """Swap in new content the kubelet way: new directory, `..data` symlink renamed over."""
    old = os.readlink(volume / "..data")
    generation = _write_generation(volume, files)
    os.symlink(generation, volume / "..data_tmp")
    os.rename(volume / "..data_tmp", volume / "..data")
    shutil.rmtree(volume / old)
