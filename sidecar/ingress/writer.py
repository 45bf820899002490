"""The data listener's response writer: uvicorn's request cycle with a leaner `send`.

uvicorn's httptools `RequestResponseCycle.send` writes the response head and each body chunk
with separate `transport.write` calls, and checks each header with two regular expressions.
For a small proxied response that is two socket writes (each a syscall that also runs the
receiver's TCP path on loopback, ~5 us here) and ~5 us of per-header work. `ProxyCycle`:

- writes the head together with the first body chunk when the app says that chunk is
  already there (`BODY_READY` in the start message; the forward path knows whether the
  upstream's first bytes came in with its head), else the head at once: an event stream or
  a slow upstream gets its head out without waiting for a body, as with uvicorn;
- checks every header name with one regex call over all names, every value with one over
  all values (the same byte sets as uvicorn: a CR, LF or other control byte is refused);
- calls `on_disconnect` (set by the app, see forward.DisconnectWatch) when the client's
  connection is lost before the response is complete, so the app needs no watcher task.

The protocol (limits.LimitedHttpToolsProtocol) makes each new cycle a ProxyCycle; the app
finds it as `send.__self__` (the ASGI `send` is the cycle's bound method). Not through the
scope: the cycle holds the scope, so a scope entry naming the cycle would make every request
a reference cycle, left for the garbage collector (it was: ~5 us a request). For the same
reason `on_disconnect` (which names the app's watch, which names the cycle) is cleared when
the response completes. Otherwise the ASGI contract is
uvicorn's: same framing (Content-Length, else chunked; none for HEAD, 204, 304), same errors
for a body longer or shorter than its Content-Length, flow control, keep-alive and close.
uvicorn's own access log line is not written: the sidecar keeps its own (access_log.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sidecar._compat.uvicorn import STATUS_LINE, RequestResponseCycle

# In an `http.response.start` message: the first body chunk follows at once (this same step).
BODY_READY = "egress.body_ready"

# The bytes uvicorn refuses in a header name and in a header value (RFC 9110 5.1, 5.5).
_BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
_BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY_STATUSES = frozenset((204, 304))


class ProxyCycle(RequestResponseCycle):
    """uvicorn's cycle with a coalescing `send` and a disconnect callback (module doc)."""

    # Class-level defaults: the protocol turns uvicorn's freshly built cycle into this class
    # (see limits.py), so there is no __init__ of ours to set them.
    on_disconnect: Callable[[], None] | None = None
    _held: bytes | None = None  # the response head, waiting for the body chunk announced ready

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected ASGI message 'http.response.start', but got '{kind}'.")
            self._start(message["status"], message.get("headers", ()), message.get(BODY_READY, False))
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent, after response already completed.")

    def _start(self, status: int, headers: Any, body_ready: bool) -> None:
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.default_headers:
            headers = self.default_headers + list(headers)
        # parts: status line, then name, ": ", value, CRLF per field (names at 1::4, values at 3::4)
        parts = [STATUS_LINE[status]]
        close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length":
                if self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
            elif name == b"transfer-encoding":
                if value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
            elif name == b"connection" and b"close" in [token.strip() for token in value.lower().split(b",")]:
                self.keep_alive = False
                close = True
            parts += (name, b": ", value, b"\r\n")
        if _BAD_NAME.search(b"".join(parts[1::4])):
            raise RuntimeError("Invalid HTTP header name.")
        if _BAD_VALUE.search(b"".join(parts[3::4])):
            raise RuntimeError("Invalid HTTP header value.")
        if not self.keep_alive and not close:
            parts.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in _NO_BODY_STATUSES:
            self.chunked_encoding = True
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        if body_ready:
            self._held = b"".join(parts)
        else:
            self.transport.write(b"".join(parts))

    def _body(self, body: bytes, more_body: bool) -> None:
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            if body:
                data = b"%x\r\n%b\r\n" % (len(body), body)
                if not more_body:
                    data += b"0\r\n\r\n"
            else:
                data = b"" if more_body else b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        head = self._held
        if head is not None:
            self._held = None
            data = head + data
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.on_disconnect = None  # breaks cycle -> watch -> cycle (module doc)
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()
