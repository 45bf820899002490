"""`egress-sidecar lock`: install the egress lock's rules in this network namespace, once.

Run by the init container (NET_ADMIN, NET_RAW) before the app and the sidecar start. The
rules themselves are lock_rules.py's; this module picks the backend the image and kernel
offer (nftables, else iptables-restore for IPv4 and IPv6), applies the rules so that a second
run replaces the first, prints what is installed as the kernel reports it, and refuses with
one clear line when it lacks CAP_NET_ADMIN or the backend refuses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.config import Config
from sidecar.lock import rules as lock_rules

CAP_NET_ADMIN = 12  # linux/capability.h
_TIMEOUT = 30


class LockError(Exception):
    """The lock cannot be installed; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class LockOptions:
    sidecar_uid: int = 65532
    backend: str = "auto"  # auto, nft, iptables
    resolv_conf: str = "/etc/resolv.conf"
    dry_run: bool = False


def has_net_admin(status_text: str) -> bool:
    """Whether CAP_NET_ADMIN is in the effective set, from /proc/self/status."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def build_plan(config: Config, options: LockOptions, resolv_conf_text: str) -> lock_rules.LockPlan:
    port = config.listen.transparent_port
    if not port:
        raise LockError("listen.transparent_port is off (null or 0): there is nothing to redirect to")
    return lock_rules.plan(
        transparent_port=port,
        sidecar_uid=options.sidecar_uid,
        resolvers=lock_rules.resolvers_from_resolv_conf(resolv_conf_text),
        skip_cidrs=config.lock.skip_cidrs,
        skip_ports=config.lock.skip_ports,
    )


def _run(command: Sequence[str], stdin: str | None = None) -> str:
    try:
        result = subprocess.run(list(command), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT,
                                check=False)
    except OSError as exc:
        raise LockError(f"cannot run {command[0]}: {exc.strerror}") from None
    if result.returncode != 0:
        problem = (result.stderr or result.stdout).strip().splitlines()
        text = "; ".join(problem[-3:]) or f"exit status {result.returncode}"
        if "ermission denied" in text or "Operation not permitted" in text:
            text += " (the lock needs CAP_NET_ADMIN and CAP_NET_RAW, as root, in the pod's network namespace)"
        raise LockError(f"{' '.join(command[:2])} failed: {text}")
    return result.stdout


def choose_backend(requested: str) -> str:
    """nft when asked, or when `auto` and the nft command works here; else iptables."""
    if requested in ("nft", "iptables"):
        return requested
    if shutil.which("nft") is not None:
        try:
            _run(["nft", "list", "tables"])
            return "nft"
        except LockError:
            pass
    if shutil.which("iptables-restore") is not None and shutil.which("ip6tables-restore") is not None:
        return "iptables"
    raise LockError("neither nft nor iptables-restore/ip6tables-restore works in this image")


def install(plan: lock_rules.LockPlan, backend: str) -> str:
    """Apply the plan with `backend`; returns the installed rules as the kernel lists them."""
    if backend == "nft":
        _run(["nft", "-f", "-"], lock_rules.nft_ruleset(plan))
        return _run(["nft", "list", "table", "inet", lock_rules.TABLE])
    shown: list[str] = []
    families: tuple[tuple[lock_rules.Family, str], ...] = ((4, "ip"), (6, "ip6"))
    if not os.path.exists("/proc/net/if_inet6"):
        # A kernel without IPv6: no IPv6 packet can leave, and ip6tables would fail.
        families = families[:1]
        shown.append("# no IPv6 in this kernel: IPv4 rules only\n")
    for family, prefix in families:
        saved = {table: _run([f"{prefix}tables-save", "-t", table]) for table in ("nat", "filter")}
        jumps = lock_rules.jumps_in(saved)
        _run([f"{prefix}tables-restore", "--noflush"], lock_rules.iptables_restore(plan, family, jumps_present=jumps))
        for table in ("nat", "filter"):
            shown.append(f"# {prefix}tables -t {table}\n" + _run([f"{prefix}tables", "-t", table, "-S", "OUTPUT"])
                         + _run([f"{prefix}tables", "-t", table, "-S", lock_rules.CHAIN]))
    return "".join(shown)


def main(config: Config, options: LockOptions) -> int:
    try:
        try:
            with open(options.resolv_conf) as handle:
                resolv = handle.read()
        except OSError as exc:
            raise LockError(f"cannot read {options.resolv_conf}: {exc.strerror}") from None
        plan = build_plan(config, options, resolv)
        if options.dry_run:
            sys.stdout.write(lock_rules.nft_ruleset(plan) if options.backend != "iptables" else
                             lock_rules.iptables_restore(plan, 4) + lock_rules.iptables_restore(plan, 6))
            return 0
        with open("/proc/self/status") as status:
            if not has_net_admin(status.read()):
                raise LockError("refusing: no CAP_NET_ADMIN in this process (run as the init container with "
                                "capabilities NET_ADMIN and NET_RAW, as root); nothing was installed")
        backend = choose_backend(options.backend)
        try:
            installed = install(plan, backend)
        except LockError as exc:
            if options.backend != "auto" or backend != "nft" or shutil.which("iptables-restore") is None:
                raise
            # nft runs but this kernel refuses the ruleset (an inet nat chain needs 5.2+): iptables.
            print(f"egress-sidecar lock: nft refused ({exc}); trying iptables", file=sys.stderr)
            backend = "iptables"
            installed = install(plan, backend)
    except (LockError, ValueError) as exc:
        print(f"egress-sidecar lock: {exc}", file=sys.stderr)
        return 1
    resolvers = ", ".join(str(n.network_address) for n in plan.resolvers) or "none"
    print(f"egress-sidecar lock: installed with {backend}: TCP -> :{plan.transparent_port}, "
          f"uid {plan.sidecar_uid} exempt, DNS to {resolvers}, every other outbound packet dropped (counted)")
    sys.stdout.write(installed)
    return 0
