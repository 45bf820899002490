"""A locked pod: the real `egress-sidecar lock` run in the pod namespace, the real sidecar as UID
65532, and an "app" that runs commands (curl, python) as another UID with no proxy settings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.processes import stop_process
from tests.sealed import pod
from tests.upstream import wait_until

SIDECAR_UID = 65532
APP_UID = 1000
PORTS = {"listen": 15001, "admin": 15090, "transparent": 15006}  # the pod is fresh: the defaults are free


@dataclass
class LockedPod:
    net: pod.PodNetwork
    workdir: Path
    config_path: Path
    log_path: Path
    lock_output: str
    backend: str = "auto"
    sidecar: subprocess.Popen[bytes] | None = None

    def lock(self, *extra: str) -> subprocess.CompletedProcess[bytes]:
        return self.net.run([sys.executable, "-m", "sidecar", "lock", "--config", str(self.config_path),
                             "--resolv-conf", str(self.workdir / "resolv.conf"), *extra])

    def logs(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def curl(self, url: str, *options: str, timeout: float = 15) -> tuple[int, dict[str, str], bytes, int]:
        """curl as the app: (status, headers, body, curl's exit code); status 0 when none came back."""
        out = Path(tempfile.mkstemp(dir=self.workdir, prefix="body-")[1])
        head = out.with_suffix(".head")
        os.chmod(out, 0o666)
        head.touch(mode=0o666)
        os.chmod(head, 0o666)
        direct = [] if "--proxy" in options else ["--noproxy", "*"]  # the app has no proxy settings
        result = self.net.run(["curl", "-sS", *direct, "--max-time", str(timeout - 3), "-o", str(out),
                               "-D", str(head), "-w", "%{http_code}", *options, url], uid=APP_UID, timeout=timeout)
        headers = {}
        for line in head.read_text("latin-1").splitlines()[1:]:
            name, _, value = line.partition(":")
            if value:
                headers[name.strip().lower()] = value.strip()
        body = out.read_bytes()
        out.unlink()
        head.unlink()
        return int(result.stdout or b"0"), headers, body, result.returncode

    def app_python(self, code: str, timeout: float = 15) -> Any:
        """Run `code` as the app; it prints one JSON value, returned here."""
        result = self.net.run([sys.executable, "-c", code], uid=APP_UID, timeout=timeout)
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def admin_get(self, path: str) -> httpx.Response:
        def get() -> httpx.Response:
            return httpx.get(f"http://127.0.0.1:{PORTS['admin']}{path}", timeout=5)
        return pod.in_netns(self.net.pod, get)

    def stop(self) -> None:
        if self.sidecar is not None:
            stop_process(self.sidecar)
        self.net.delete()
        shutil.rmtree(self.workdir, ignore_errors=True)


def write_config(workdir: Path, ca_pem: bytes, overrides: dict[str, Any]) -> Path:
    (workdir / "ca.pem").write_bytes(ca_pem)
    config: dict[str, Any] = {
        "listen": {"port": PORTS["listen"], "transparent_port": PORTS["transparent"]},
        "admin": {"host": "127.0.0.1", "port": PORTS["admin"]},
        "tls": {"ca_file": str(workdir / "ca.pem")},
        "log": {"format": "json", "level": "info"},
        "drain": {"grace": "1s"},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _uids_mapped(*uids: int) -> bool:
    """Whether this (user) namespace can switch to these UIDs: real root can; an unprivileged
    `unshare --user --map-root-user` maps only root, so setpriv to 65532 would fail."""
    try:
        with open("/proc/self/uid_map") as lines:
            ranges = [tuple(int(x) for x in line.split()) for line in lines if line.strip()]
    except OSError:
        return False
    return all(any(inside <= uid < inside + count for inside, _outside, count in ranges) for uid in uids)


def start(suffix: str, ca_pem: bytes, config: dict[str, Any], *, backend: str = "auto",
          before_lock: Any = None) -> LockedPod:
    """Make the pod and world, lock the pod, start the sidecar in it as UID 65532."""
    if not _uids_mapped(SIDECAR_UID, APP_UID):
        pytest.skip(f"the lock tests run the sidecar as UID {SIDECAR_UID} and the app as UID {APP_UID}: "
                    "this user namespace maps only root (run as root)")
    net = pod.create(suffix)
    problem = pod.not_sealed_reason(net)
    if problem is not None:
        net.delete()
        raise AssertionError(f"refusing to send: the pod/world pair is not sealed: {problem}")
    workdir = Path(tempfile.mkdtemp(prefix=f"egress-lock-{suffix}-"))
    os.chmod(workdir, 0o777)  # the sidecar (65532) reads its config; the app (1000) writes curl's output
    (workdir / "resolv.conf").write_text(f"nameserver {pod.WORLD_V4}\nnameserver {pod.WORLD_V6}\n")
    config_path = write_config(workdir, ca_pem, config)
    for path in workdir.iterdir():
        os.chmod(path, 0o644)
    locked = LockedPod(net, workdir, config_path, workdir / "sidecar.log", "", backend)
    try:
        if before_lock is not None:
            before_lock(locked)
        result = locked.lock("--backend", backend)
        locked.lock_output = result.stdout.decode() + result.stderr.decode()
        assert result.returncode == 0, locked.lock_output
        with open(locked.log_path, "wb") as log:
            locked.sidecar = net.popen([sys.executable, "-m", "sidecar", "run", "--config", str(config_path)],
                                       uid=SIDECAR_UID, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

        def ready() -> bool:
            assert locked.sidecar is not None
            if locked.sidecar.poll() is not None:
                raise AssertionError(f"sidecar exited: {locked.log_path.read_text()[-2000:]}")
            try:
                return locked.admin_get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout=20, message="sidecar ready in the pod")
    except BaseException:
        locked.stop()
        raise
    return locked


@dataclass
class UDPCatcher:
    """Records every datagram to its address (created in the world with pod.in_netns)."""

    sock: socket.socket
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def bind(cls, host: str, port: int) -> UDPCatcher:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.settimeout(0.2)
        catcher = cls(sock)
        threading.Thread(target=catcher._run, daemon=True).start()
        return catcher

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((peer[0], data))

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
