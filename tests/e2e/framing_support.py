"""A raw-socket HTTP/1.1 client for the framing tests: it sends bytes exactly as written
(smuggling payloads no real client library would produce) and reads every response that
comes back until the sidecar closes the connection."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import httptools


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes] = field(default_factory=dict)  # names lower-cased; last one wins
    body: bytes = b""


@dataclass
class Exchange:
    answers: list[Answer]
    closed: bool  # the sidecar closed the connection (EOF) rather than us timing out
    reset: bool  # the connection was reset (an answer may have been destroyed)
    raw: bytes  # every byte received


class _Responses:
    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.answers.append(Answer(0))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.answers[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body


def exchange(port: int, payload: bytes, timeout: float = 10.0) -> Exchange:
    """Send `payload` in one write; read answers until the sidecar closes (or `timeout`)."""
    responses = _Responses()
    closed = reset = False
    raw = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except TimeoutError:
                break
            if not data:
                closed = True
                break
            raw += data
            responses.parser.feed_data(data)
    return Exchange(responses.answers, closed, reset, bytes(raw))
