"""A tiny authoritative DNS server for the sealed namespace, and the resolv.conf that uses it.

It answers A/AAAA queries from a table with TTL 0; a name may list successive answers
(`[["1.1.1.1"], ["10.0.0.1"]]`: the first A query gets the public address, later ones the
private one), which is exactly DNS rebinding. Only for use inside the sealed namespace, where
/etc/resolv.conf can be bind-mounted in a private mount namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

A, AAAA = 1, 28


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    labels = []
    while True:
        length = packet[offset]
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), offset
        labels.append(packet[offset : offset + length].decode("ascii", "replace"))
        offset += length


class DNSServer:
    """UDP DNS on 127.0.0.1:53 in a thread; `queries` records (name, qtype) in order."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = {name.lower(): list(seq) for name, seq in answers.items()}
        self.queries: list[tuple[str, int]] = []
        self._a_lookups: dict[str, int] = {}
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _addresses(self, name: str, qtype: int) -> list[str] | None:
        sequence = self.answers.get(name)
        if sequence is None:
            return None
        with self._lock:
            if qtype == A:
                index = self._a_lookups.get(name, 0)
                self._a_lookups[name] = index + 1
            else:
                index = max(self._a_lookups.get(name, 1) - 1, 0)  # AAAA follows the same step
        chosen = sequence[min(index, len(sequence) - 1)]
        version = 4 if qtype == A else 6
        return [a for a in chosen if ipaddress.ip_address(a).version == version]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                reply = self._answer(packet)
            except (IndexError, struct.error):
                continue
            self.sock.sendto(reply, peer)

    def _answer(self, packet: bytes) -> bytes:
        ident, _flags, _qd, _an, _ns, _ar = struct.unpack("!6H", packet[:12])
        name, offset = _read_name(packet, 12)
        qtype, _qclass = struct.unpack("!HH", packet[offset : offset + 4])
        question = packet[12 : offset + 4]
        with self._lock:
            self.queries.append((name, qtype))
        addresses = self._addresses(name, qtype) if qtype in (A, AAAA) else []
        rcode = 3 if addresses is None else 0  # NXDOMAIN for names not in the table
        records = b""
        for address in addresses or []:
            data = ipaddress.ip_address(address).packed
            # 0xC00C: a pointer to the question's name at offset 12.
            records += struct.pack("!HHHIH", 0xC00C, qtype, 1, 0, len(data)) + data
        flags = 0x8400 | rcode  # response, authoritative
        return struct.pack("!6H", ident, flags, 1, len(addresses or []), 0, 0) + question + records

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


OUTER_MOUNT_NS_ENV = "EGRESS_SEALED_OUTER_MNT"


def mount_namespace() -> str:
    return os.readlink("/proc/self/ns/mnt")


def in_private_mount_namespace() -> bool:
    """True when this process's mount namespace differs from the one the outer pytest ran in."""
    outer = os.environ.get(OUTER_MOUNT_NS_ENV)
    try:
        return bool(outer) and mount_namespace() != outer
    except OSError:
        return False


def use_resolver(directory: Path) -> None:
    """Point this namespace's /etc/resolv.conf at 127.0.0.1 (bind mount; host untouched)."""
    if not in_private_mount_namespace():
        raise RuntimeError("refusing to bind-mount /etc/resolv.conf outside a private mount namespace")
    conf = directory / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    subprocess.run(["mount", "--bind", str(conf), "/etc/resolv.conf"], check=True, capture_output=True, timeout=10)
