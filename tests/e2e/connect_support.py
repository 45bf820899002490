"""Helpers for the tunnel tests: a raw CONNECT client, real ClientHellos, a recording TCP upstream."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def client_hello(server_hostname: str | None) -> bytes:
    """The first bytes Python's TLS client sends for `server_hostname` (None: no SNI)."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a response head off `sock`: (status, headers, bytes after the head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed inside the response head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    return int(lines[0].split()[1]), headers, rest


def connect(port: int, authority: str, timeout: float = 10.0) -> tuple[socket.socket, int, dict[str, str], bytes]:
    """A CONNECT for `authority` through the sidecar on `port`: (socket, status, headers, rest)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    status, headers, rest = read_head(sock)
    return sock, status, headers, rest


def read_to_eof(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (a reset counts as a close)."""
    chunks = []
    size = 0
    try:
        while size <= limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Conn:
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False  # the peer half-closed or closed
    closed: bool = False  # our side is done


class TcpUpstream:
    """A plain TCP listener on 127.0.0.1 recording each connection and the bytes it got.

    mode: "record" (read to EOF, then answer `got <n>` and close: shows half-close both
    ways), "echo" (echo every chunk, close at EOF), "source" (after the first bytes, send
    `size` bytes, then close), "reset" (after the first bytes, send `size` bytes, then RST),
    "banner" (a server that speaks first, like SMTP: `220 ready` at once, then "record").
    """

    def __init__(self, mode: str = "record", size: int = 0) -> None:
        self.mode = mode
        self.size = size
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def received(self) -> bytes:
        with self._lock:
            return b"".join(bytes(c.received) for c in self.conns)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            conn = Conn()
            with self._lock:
                self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket, conn: Conn) -> None:
        sock.settimeout(0.2)
        try:
            if self.mode == "banner":
                sock.sendall(b"220 ready\r\n")
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    conn.eof = True
                    if self.mode in ("record", "banner"):
                        sock.sendall(b"got %d" % len(conn.received))
                    break
                conn.received += data
                if self.mode == "echo":
                    sock.sendall(data)
                elif self.mode in ("source", "reset"):
                    sock.settimeout(30)
                    block = b"\x00" * 65536
                    left = self.size
                    while left > 0 and not self._stop.is_set():
                        sock.sendall(block[: min(left, len(block))])
                        left -= min(left, len(block))
                    if self.mode == "reset":
                        reset(sock)
                        return
                    break
        except OSError:
            pass
        finally:
            conn.closed = True
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for thread in self._threads:
            thread.join(5)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))
