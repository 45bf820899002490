"""The egress lock's packet rules, as text: pure functions from a `LockPlan` to a ruleset.

`egress-sidecar lock` (sidecar/lock/install.py) runs once in the pod's network namespace, before the
app starts, and installs what these functions return. The rules, for IPv4 and IPv6 alike:

1. leave alone: loopback (`-o lo`: the app talking to the sidecar, the pod's own addresses),
   the sidecar's own sockets (owner UID, 65532 in the image), DNS (UDP and TCP 53) to the
   resolvers named in /etc/resolv.conf, and the holes `lock.skip_cidrs` / `lock.skip_ports`;
2. NAT: redirect every other new outbound TCP connection to the transparent listener
   (`listen.transparent_port`); the filter lets the redirected packets through by their new
   destination (127.0.0.1 or ::1 and that port);
3. filter: drop every other outbound packet (UDP other than DNS, QUIC included; TCP that
   escaped the NAT; ping), counted by the rule's counter. What passes: replies of
   connections the pod accepted and ICMP errors about them (conntrack ESTABLISHED/RELATED:
   the pod may still serve), and IPv6 neighbour discovery / MLD, without which IPv6 on the
   pod's interface stops working for everyone, the sidecar included.

Two renderings of the same plan: one nftables table (`inet egress_lock`, replaced atomically
by one `nft -f`) and iptables-restore input (one `EGRESS_OUTPUT` chain per table; the jump
from `OUTPUT` is added only when absent, so a second run replaces rather than duplicates).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Family = Literal[4, 6]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TABLE = "egress_lock"  # nftables: table inet egress_lock
CHAIN = "EGRESS_OUTPUT"  # iptables: the chain OUTPUT jumps to, in nat and filter
DNS_PORT = 53
# ICMPv6 the kernel itself sends for the interface to work at all (RFC 4861 neighbour and
# router discovery, RFC 3810 multicast listener reports). Not data: no socket of the app's.
ICMPV6_NEEDED = (
    "nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert",
    "mld-listener-report", "mld2-listener-report",
)
_ICMPV6_NUMBERS = {"nd-router-solicit": 133, "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136,
                   "mld-listener-report": 131, "mld2-listener-report": 143}


@dataclass(frozen=True, slots=True)
class LockPlan:
    """What the lock exempts and where it redirects; built from flags, config and resolv.conf."""

    transparent_port: int
    sidecar_uid: int
    resolvers: tuple[IPNetwork, ...] = ()  # as /32 and /128 networks
    skip_cidrs: tuple[IPNetwork, ...] = ()
    skip_ports: tuple[int, ...] = ()

    def resolvers_of(self, family: Family) -> list[str]:
        return [str(net) for net in self.resolvers if net.version == family]

    def skips_of(self, family: Family) -> list[str]:
        return [str(net) for net in self.skip_cidrs if net.version == family]


def plan(
    *,
    transparent_port: int,
    sidecar_uid: int,
    resolvers: Iterable[str] = (),
    skip_cidrs: Iterable[str] = (),
    skip_ports: Iterable[int] = (),
) -> LockPlan:
    """Validate and normalise the inputs; ValueError names the bad one."""
    if not 0 < transparent_port < 65536:
        raise ValueError(f"transparent port {transparent_port} is out of range 1-65535")
    if sidecar_uid < 0:
        raise ValueError(f"uid {sidecar_uid} is negative")
    nets = []
    for text in resolvers:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # a scoped fe80::1%eth0 keeps its address
        nets.append(ipaddress.ip_network(address))
    skips = tuple(ipaddress.ip_network(text, strict=False) for text in skip_cidrs)
    ports = tuple(sorted(set(skip_ports)))
    for port in ports:
        if not 0 < port < 65536:
            raise ValueError(f"skip port {port} is out of range 1-65535")
    return LockPlan(transparent_port, sidecar_uid, tuple(dict.fromkeys(nets)), skips, ports)


def resolvers_from_resolv_conf(text: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf (loopback ones too; `lo` is exempt anyway)."""
    found = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue  # not an address: the resolver ignores it too
            found.append(fields[1])
    return found


# --- nftables --------------------------------------------------------------------------


def _nft_set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _nft_exemptions(p: LockPlan, *, udp: bool) -> list[str]:
    """The rules that RETURN (leave alone) in both chains; `udp`: the filter chain's UDP too."""
    protocols = "{ tcp, udp }" if udp else "tcp"
    rules = ['oifname "lo" return', f"meta skuid {p.sidecar_uid} return"]
    for family, keyword in ((4, "ip"), (6, "ip6")):
        skips = p.skips_of(family)  # type: ignore[arg-type]
        if skips:
            rules.append(f"{keyword} daddr {_nft_set(skips)} return")
    if p.skip_ports:
        rules.append(f"meta l4proto {protocols} th dport {_nft_set([str(x) for x in p.skip_ports])} return")
    for family, keyword in ((4, "ip"), (6, "ip6")):
        resolvers = p.resolvers_of(family)  # type: ignore[arg-type]
        if resolvers:
            rules.append(f"{keyword} daddr {_nft_set(resolvers)} meta l4proto {protocols} th dport {DNS_PORT} return")
    return rules


def nft_ruleset(p: LockPlan) -> str:
    """`nft -f` input replacing table inet egress_lock atomically (IPv4 and IPv6 in one table).

    The empty `table` line first makes the `delete` valid when the table does not exist yet,
    so the same text installs and re-installs (the idiom nft's manual gives).
    """
    nat = [*_nft_exemptions(p, udp=False), f"meta l4proto tcp counter redirect to :{p.transparent_port}"]
    filt = [
        *_nft_exemptions(p, udp=True),
        # A redirected packet keeps the output interface the route gave it before the NAT hook
        # (the hook state's `out` is fixed for the whole OUTPUT traversal): it is let through
        # by its new destination, the transparent listener, not by `oifname "lo"`.
        f"ip daddr 127.0.0.1 tcp dport {p.transparent_port} return",
        f"ip6 daddr ::1 tcp dport {p.transparent_port} return",
        "ct state established,related return",
        f"icmpv6 type {_nft_set(list(ICMPV6_NEEDED))} return",
        "counter drop",
    ]
    lines = [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    lines += ["  chain nat_output {", "    type nat hook output priority -100; policy accept;"]
    lines += [f"    {rule}" for rule in nat] + ["  }"]
    lines += ["  chain filter_output {", "    type filter hook output priority 0; policy accept;"]
    lines += [f"    {rule}" for rule in filt] + ["  }", "}"]
    return "\n".join(lines) + "\n"


# --- iptables ---------------------------------------------------------------------------


def _ipt_exemptions(p: LockPlan, family: Family, *, udp: bool) -> list[str]:
    protocols = ("tcp", "udp") if udp else ("tcp",)
    rules = ["-o lo -j RETURN", f"-m owner --uid-owner {p.sidecar_uid} -j RETURN"]
    rules += [f"-d {cidr} -j RETURN" for cidr in p.skips_of(family)]
    for protocol in protocols:
        if p.skip_ports:
            ports = ",".join(str(x) for x in p.skip_ports)
            rules.append(f"-p {protocol} -m multiport --dports {ports} -j RETURN")
    for resolver in p.resolvers_of(family):
        rules += [f"-d {resolver} -p {protocol} --dport {DNS_PORT} -j RETURN" for protocol in protocols]
    return rules


def iptables_restore(p: LockPlan, family: Family, *, jumps_present: tuple[bool, bool] = (False, False)) -> str:
    """`iptables-restore --noflush` (or ip6tables-restore) input for one family.

    Declaring `:EGRESS_OUTPUT` flushes that chain (creating it if needed); nothing else in
    the tables is touched. `jumps_present`: whether OUTPUT already jumps to it in (nat, filter).
    """
    redirect = f"-p tcp -j REDIRECT --to-ports {p.transparent_port}"
    nat = [*_ipt_exemptions(p, family, udp=False), redirect]
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    filt = [*_ipt_exemptions(p, family, udp=True),
            f"-d {loopback} -p tcp --dport {p.transparent_port} -j RETURN",  # redirected (see nft_ruleset)
            "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"]
    if family == 6:
        filt += [f"-p ipv6-icmp --icmpv6-type {_ICMPV6_NUMBERS[name]} -j RETURN" for name in ICMPV6_NEEDED]
    filt.append("-j DROP")
    lines = []
    for table, rules, jump, present in (
        ("nat", nat, f"-p tcp -j {CHAIN}", jumps_present[0]),
        ("filter", filt, f"-j {CHAIN}", jumps_present[1]),
    ):
        lines += [f"*{table}", f":{CHAIN} - [0:0]"]
        lines += [f"-A {CHAIN} {rule}" for rule in rules]
        if not present:
            lines.append(f"-A OUTPUT {jump}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


JUMPS = {"nat": f"-A OUTPUT -p tcp -j {CHAIN}", "filter": f"-A OUTPUT -j {CHAIN}"}


def jumps_in(saved: dict[str, str]) -> tuple[bool, bool]:
    """From `iptables-save -t nat` and `-t filter` output: whether OUTPUT jumps to our chain."""
    return tuple(JUMPS[table] in saved.get(table, "").splitlines() for table in ("nat", "filter"))  # type: ignore[return-value]
