"""The real sidecar with interception on: what it writes at start, what it never writes or logs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml
from cryptography import x509

from tests.conftest import ROOT, Sidecar, base_config


def test_start_writes_the_constrained_ca_and_the_bundle_and_never_the_key(
    make_sidecar: Callable[..., Sidecar], tmp_path: Path, ca_file: str
) -> None:
    started = time.time()
    ca_dir = tmp_path / "ca"
    sidecar = make_sidecar(env={"TMPDIR": str(tmp_path)},
                           intercept={"hosts": ["*.example.com", "api.test"], "ca_dir": str(ca_dir)})
    assert sorted(p.name for p in ca_dir.iterdir()) == ["bundle.pem", "ca.crt"]
    ca_pem = (ca_dir / "ca.crt").read_bytes()
    roots = Path(ca_file).read_bytes()
    assert (ca_dir / "bundle.pem").read_bytes() == roots + (b"" if roots.endswith(b"\n") else b"\n") + ca_pem
    constraints = x509.load_pem_x509_certificate(ca_pem).extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.DNSName("example.com"), x509.DNSName("api.test")]
    config = httpx.get(f"{sidecar.admin_url}/config", timeout=5).text
    assert "PRIVATE KEY" not in config and '"ca_dir"' in config
    sidecar.wait_log(lambda e: e.get("event") == "intercept_ca_written")
    assert sidecar.terminate() == 0
    assert "PRIVATE" not in sidecar.log_path.read_text()
    # Everything the sidecar could have written since it started (its TMPDIR is the test's directory,
    # its working directory the checkout, plus /dev/shm): no private key in any PEM form. (The unit
    # test test_intercept_ca.py::test_the_key_is_in_no_file_and_not_in_the_repr looks for the key's
    # exact bytes in every encoding, which only a process holding the key can know.)
    scanned = 0
    for root in (tmp_path, Path("/dev/shm"), ROOT):
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv")]
            for name in files:
                path = Path(directory) / name
                try:
                    if path.is_symlink() or not path.is_file() or path.stat().st_mtime < started:
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                scanned += 1
                assert b"PRIVATE KEY" not in data, path
    assert scanned >= 3  # config, log, ca.crt, bundle.pem at least


def test_readyz_fails_while_the_bundle_is_missing(make_sidecar: Callable[..., Sidecar], tmp_path: Path) -> None:
    sidecar = make_sidecar(intercept={"hosts": ["api.test"], "ca_dir": str(tmp_path / "ca")})
    (tmp_path / "ca" / "bundle.pem").unlink()
    response = httpx.get(f"{sidecar.admin_url}/readyz", timeout=5)
    assert response.status_code == 503 and b"bundle missing" in response.content


def test_an_unwritable_ca_dir_stops_start_naming_the_key(tmp_path: Path, ca_file: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = base_config(ca_file, intercept={"hosts": ["api.test"], "ca_dir": str(blocker / "ca")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "sidecar", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "intercept.ca_dir" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_without_interception_no_ca_is_made_and_cryptography_is_not_loaded(tmp_path: Path) -> None:
    code = ("import sys; from sidecar import config; from sidecar.runtime import build_runtime; "
            "r = build_runtime(config.Config()); print(r.interceptor, 'cryptography' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["None", "False"]
    code = ("import sys; from sidecar import config; from sidecar.runtime import build_runtime; "
            "r = build_runtime(config.from_mapping({'intercept': {'hosts': ['a.test']}})); "
            "print(r.interceptor is not None, 'cryptography' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["True", "True"]
