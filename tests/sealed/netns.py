"""The sealed network namespace: how to enter one, how to prove we are in one, how to fill it.

A namespace made by `unshare --net` has only a loopback interface and no routes, so nothing
sent in it can leave the machine. Adding each target address to `lo` makes it local: the
catching listeners on `[::]:80` and `[::]:443` then see any connection a policy bug lets
through, and every other address fails at once with ENETUNREACH.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess

# Addresses the SSRF vectors aim at, added to lo inside the namespace.
IPV4_TARGETS = (
    "169.254.169.254",  # cloud metadata
    "169.254.170.2",  # ECS task metadata
    "169.254.10.10",  # link-local
    "10.0.0.1",  # RFC 1918
    "172.16.0.1",
    "192.168.1.1",
    "100.100.100.200",  # Alibaba metadata (in CGNAT space)
    "100.64.0.1",  # CGNAT
    "198.18.0.1",  # benchmarking
    "192.0.2.1",  # TEST-NET-1
    "1.1.1.1",  # a "public" address: the positive control
    "8.8.4.4",  # another public address, for the one-public-one-private name
)
IPV6_TARGETS = (
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fc00::1",  # unique local
    "2001:db8::1",  # documentation
    "2606:4700:4700::1111",  # a "public" IPv6 address
)
# Not added to lo: a connect here must fail at once, proving the namespace has no route out.
UNREACHABLE_V4 = "198.51.100.7"
UNREACHABLE_V6 = "2001:db8:ffff::7"


def interfaces() -> list[str]:
    return sorted(name for _index, name in socket.if_nameindex())


def _routes_off_loopback() -> list[str]:
    found = []
    for path, iface_column in (("/proc/net/route", 0), ("/proc/net/ipv6_route", -1)):
        try:
            with open(path) as lines:
                rows = lines.read().splitlines()
        except OSError:
            continue
        if path.endswith("/route"):
            rows = rows[1:]  # header line
        found += [row for row in rows if row.split() and row.split()[iface_column] != "lo"]
    return found


def _connect_fails_unreachable(address: str) -> str | None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect((address, 9))
        except OSError as exc:
            # ENETUNREACH: no route. EADDRNOTAVAIL: lo not up yet, so no source address either.
            if exc.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL):
                return None
            return f"connect to {address} failed with {errno.errorcode.get(exc.errno or 0, exc)} instead of ENETUNREACH"
        return f"connect to {address} succeeded"


def not_sealed_reason() -> str | None:
    """Why this process is NOT in a sealed namespace, or None if it is.

    The interface and route checks come first and send nothing; only once they show that
    loopback is all there is does a connect to an address not on lo prove it (ENETUNREACH).
    """
    names = interfaces()
    if names != ["lo"]:
        return f"network interfaces {names} besides lo"
    routes = _routes_off_loopback()
    if routes:
        return f"routes off loopback: {routes[:3]}"
    for address in (UNREACHABLE_V4, UNREACHABLE_V6):
        problem = _connect_fails_unreachable(address)
        if problem:
            return problem
    return None


def add_target_addresses() -> None:
    """Bring lo up and make every target address local (needs CAP_NET_ADMIN in the namespace)."""
    commands = [["ip", "link", "set", "lo", "up"]]
    commands += [["ip", "addr", "add", f"{a}/32", "dev", "lo"] for a in IPV4_TARGETS]
    commands += [["ip", "-6", "addr", "add", f"{a}/128", "dev", "lo"] for a in IPV6_TARGETS]
    for command in commands:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
        if result.returncode != 0 and "File exists" not in result.stderr:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def unshare_prefix() -> tuple[list[str] | None, str]:
    """The command prefix that runs a command sealed, or None and the reason it cannot."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return None, f"`{tool}` is not installed (util-linux / iproute2; scripts/install-system-deps.sh)"
    # A mount namespace too, so a test may bind-mount its own /etc/resolv.conf; without one the
    # DNS tests skip and the rest still run.
    base = ["unshare"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user"]
    # (Unprivileged user namespaces give root inside: enough for `ip addr add` on lo.)
    candidates = [[*base, "--net", "--mount"], [*base, "--net"]]
    problems = []
    for prefix in candidates:
        result = subprocess.run([*prefix, "true"], check=False, capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            return prefix, ""
        problems.append(f"`{' '.join(prefix)}` failed: {result.stderr.strip() or result.returncode}")
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} (not root)"
    return None, f"cannot create a private network namespace as {who}: {'; '.join(problems)}"
