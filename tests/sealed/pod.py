"""A pod and the world outside it: two network namespaces joined by a veth pair, inside the sealed one.

The egress lock must be shown with destinations that are off-box for the pod, as in a cluster:
with every target on the pod's own `lo`, each destination would be a local address routed over
`lo`, and a lock that exempts `-o lo` would look right while capturing nothing. So the pod is a
namespace whose default route goes over a veth pair to a second namespace, the world, where
the targets live (on the world's `lo`, with catching listeners and a real upstream).

Both are made with `ip netns add` inside the sealed namespace's private mount namespace (the
names exist only there) and hold nothing but `lo` and their end of the pair: the world has no
route beyond the pair's subnet, so nothing can leave the machine. `assert_world_sealed` checks
exactly that before any test sends a byte.

Sockets belong to the namespace of the thread that creates them (setns(2) is per thread), so
`in_netns` runs a function in a fresh thread moved into a namespace: the catchers and the
upstream are created there and then served from any thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

POD_V4, WORLD_V4, PREFIX_V4 = "10.99.0.2", "10.99.0.1", 24
POD_V6, WORLD_V6, PREFIX_V6 = "fd99::2", "fd99::1", 64
# Addresses that live on the world's lo (the pod reaches them over its default route).
WORLD_TARGETS_V4 = ("169.254.169.254", "169.254.170.2", "10.0.0.1", "1.1.1.1", "93.184.216.34")
WORLD_TARGETS_V6 = ("2606:4700:4700::1111", "2001:4860:4860::8888", "fd00:ec2::254")
UNROUTED_V4 = "198.51.100.7"  # not in the world: a connect from the world to it must fail at once


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns({path}): {os.strerror(code)}")
    finally:
        os.close(fd)


def in_netns(name: str, function: Callable[..., T], *args: Any) -> T:
    """Call `function(*args)` in a thread moved into network namespace `name`; return its result."""
    result: list[Any] = []

    def run() -> None:
        try:
            _setns(f"/run/netns/{name}")
            result.append((True, function(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    if not result:
        raise TimeoutError(f"function in netns {name} did not return within 60s")
    ok, value = result[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def enter(name: str) -> Callable[[], None]:
    """A `before` hook for a server thread: move the calling thread into namespace `name`."""
    return lambda: _setns(f"/run/netns/{name}")


def _ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class PodNetwork:
    pod: str
    world: str

    def run(self, command: Sequence[str], *, uid: int | None = None, timeout: float = 30,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command in the pod's network namespace, as `uid` (setpriv) when given."""
        prefix = ["nsenter", f"--net=/run/netns/{self.pod}"]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return subprocess.run([*prefix, *command], capture_output=True, timeout=timeout, input=input, check=False)

    def popen(self, command: Sequence[str], *, uid: int | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        prefix = ["nsenter", f"--net=/run/netns/{self.pod}"]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return subprocess.Popen([*prefix, *command], **kwargs)

    def delete(self) -> None:
        for name in (self.pod, self.world):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


_private_run_netns = False


def _private_netns_dir() -> None:
    """A tmpfs on /run/netns in this (private) mount namespace: the names never reach the host's /run."""
    global _private_run_netns
    if _private_run_netns:
        return
    from tests.sealed.dns import in_private_mount_namespace

    if not in_private_mount_namespace():
        raise RuntimeError("not in a private mount namespace: will not add network namespace names to /run")
    os.makedirs("/run/netns", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "egress-netns", "/run/netns"], check=True, timeout=10)
    _private_run_netns = True


def create(suffix: str) -> PodNetwork:
    """Make the pod and the world, joined by a veth pair; targets on the world's lo."""
    _private_netns_dir()
    net = PodNetwork(f"egpod-{suffix}", f"egworld-{suffix}")
    net.delete()  # a leftover of an interrupted run
    _ip("netns", "add", net.pod)
    _ip("netns", "add", net.world)
    try:
        _ip("link", "add", "vpod", "netns", net.pod, "type", "veth", "peer", "name", "vworld", "netns", net.world)
        for ns, iface, v4, v6 in ((net.pod, "vpod", POD_V4, POD_V6), (net.world, "vworld", WORLD_V4, WORLD_V6)):
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("addr", "add", f"{v4}/{PREFIX_V4}", "dev", iface, netns=ns)
            _ip("-6", "addr", "add", f"{v6}/{PREFIX_V6}", "dev", iface, "nodad", netns=ns)
            _ip("link", "set", iface, "up", netns=ns)
        _ip("route", "add", "default", "via", WORLD_V4, netns=net.pod)
        _ip("-6", "route", "add", "default", "via", WORLD_V6, netns=net.pod)
        for address in WORLD_TARGETS_V4:
            _ip("addr", "add", f"{address}/32", "dev", "lo", netns=net.world)
        for address in WORLD_TARGETS_V6:
            _ip("-6", "addr", "add", f"{address}/128", "dev", "lo", netns=net.world)
    except BaseException:
        net.delete()
        raise
    return net


def _interfaces() -> list[str]:
    return sorted(name for _index, name in socket.if_nameindex())


def _default_routes() -> list[str]:
    """Default routes off lo (IPv6 lists a reject route ::/0 on lo in every namespace)."""
    found = []
    with open("/proc/net/route") as v4:
        found += [row for row in v4.read().splitlines()[1:] if row.split()[1:2] == ["00000000"]]
    with open("/proc/net/ipv6_route") as v6:
        found += [row for row in v6.read().splitlines()
                  if row.split()[:2] == ["0" * 32, "00"] and row.split()[-1] != "lo"]
    return found


def _unrouted_fails() -> int | None:
    with socket.socket() as probe:
        probe.settimeout(1)
        try:
            probe.connect((UNROUTED_V4, 9))
        except OSError as exc:
            return exc.errno
    return None


def not_sealed_reason(net: PodNetwork) -> str | None:
    """Why the pod/world pair could reach anything beyond itself, or None when it cannot."""
    if in_netns(net.world, _interfaces) != ["lo", "vworld"]:
        return f"the world has interfaces {in_netns(net.world, _interfaces)}"
    if in_netns(net.pod, _interfaces) != ["lo", "vpod"]:
        return f"the pod has interfaces {in_netns(net.pod, _interfaces)}"
    routes = in_netns(net.world, _default_routes)
    if routes:
        return f"the world has a default route: {routes}"
    link = _ip("-o", "link", "show", "vworld", netns=net.world)
    if net.pod not in link and "link-netns" not in link and "link-netnsid" not in link:
        return f"vworld's peer is not in the pod: {link.strip()}"
    code = in_netns(net.world, _unrouted_fails)
    if code != errno.ENETUNREACH:
        return f"a connect from the world to {UNROUTED_V4} did not fail with ENETUNREACH (errno {code})"
    return None
