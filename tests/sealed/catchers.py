"""Catching listeners for the sealed namespace: every TCP connection to [::]:80 or [::]:443.

Dual-stack sockets on the wildcard address accept a connection to ANY address added to lo
(169.254.169.254, 10.0.0.1, fd00:ec2::254, ...), so a policy bug that lets a connection
through is recorded with the address it aimed at. Each connection is recorded when it is
accepted, before TLS or HTTP, then answered (`200 caught <address>`) so a positive control
can also see the response come back through the sidecar.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass, field


@dataclass
class Caught:
    address: str  # the local address the client connected to: the target it aimed at
    port: int
    sni: str | None = None
    request_head: bytes = b""


# Barrier connections go here (a loopback address no test aims at) and are not reported.
SENTINEL = "127.77.77.77"


@dataclass
class _State:
    lock: threading.Condition = field(default_factory=threading.Condition)
    caught: list[Caught] = field(default_factory=list)


def _plain(address: str) -> str:
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


class Catchers:
    """Listeners on [::]:port (dual-stack) for each port; TLS on the ports given a context."""

    def __init__(self, ports: dict[int, ssl.SSLContext | None]) -> None:
        self._state = _State()
        self._ports = list(ports)
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        for port, context in ports.items():
            sock = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=128)
            sock.settimeout(0.2)  # so the accept loop notices stop()
            self._sockets.append(sock)
            thread = threading.Thread(target=self._accept, args=(sock, port, context), daemon=True)
            thread.start()
            self._threads.append(thread)

    def connections(self) -> list[Caught]:
        """Every connection accepted so far (call `barrier()` first to include all in flight)."""
        with self._state.lock:
            return [c for c in self._state.caught if c.address != SENTINEL]

    def barrier(self, timeout: float = 5.0) -> None:
        """Return once every connection made before this call has been accepted and recorded.

        A listening socket's accept queue is FIFO: once a fresh sentinel connection on each
        port has been recorded, every earlier connection to that port has been too.
        """
        for port in self._ports:
            with socket.create_connection((SENTINEL, port), timeout=timeout), self._state.lock:
                if not self._state.lock.wait_for(
                    lambda port=port: any(c.address == SENTINEL and c.port == port for c in self._state.caught), timeout
                ):
                    raise AssertionError(f"catcher on port {port} did not accept within {timeout}s")
        with self._state.lock:
            self._state.caught = [c for c in self._state.caught if c.address != SENTINEL]

    def clear(self) -> None:
        with self._state.lock:
            self._state.caught.clear()

    def _accept(self, sock: socket.socket, port: int, context: ssl.SSLContext | None) -> None:
        while not self._stop.is_set():
            try:
                conn, _peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            local = _plain(conn.getsockname()[0])
            handler = threading.Thread(target=self._serve, args=(conn, local, port, context), daemon=True)
            handler.start()

    def _serve(self, conn: socket.socket, local: str, port: int, context: ssl.SSLContext | None) -> None:
        caught = Caught(local, port)
        with self._state.lock:
            self._state.caught.append(caught)
            self._state.lock.notify_all()
        conn.settimeout(5)
        stream: socket.socket = conn
        sni: str | None = None
        try:
            if context is not None:
                stream = context.wrap_socket(conn, server_side=True)
                sni = getattr(stream, "egress_sni", None)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = stream.recv(65536)
                if not chunk:
                    break
                head += chunk
            with self._state.lock:
                caught.sni, caught.request_head = sni, head.split(b"\r\n\r\n", 1)[0]
            body = f"caught {local}:{port}".encode()
            stream.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
        except (OSError, ssl.SSLError):
            pass
        finally:
            stream.close()

    def stop(self) -> None:
        self._stop.set()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(5)


def remember_sni(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make a server context record the client's SNI on the socket (as `egress_sni`)."""

    def callback(sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        try:
            sock.egress_sni = name  # type: ignore[union-attr]
        except AttributeError:
            pass

    context.sni_callback = callback
    return context
