"""uvicorn internals the ingress builds on: the httptools protocol and cycle, the server's start.

uvicorn's public API is `Config`, `Server` and the ASGI contract; the data listener needs
more (cycle.py, limits.py, server.py, accept.py say why). Touches (uvicorn 0.55; re-read
`uvicorn/protocols/http/httptools_impl.py` and `uvicorn/server.py`):

- subclassed: `HttpToolsProtocol` (limits.LimitedHttpToolsProtocol) and
  `RequestResponseCycle` (cycle.ProxyCycle), and `STATUS_LINE`;
- rewritten, not extended (see REWRITTEN for each and its recorded source hash):
  `RequestResponseCycle.send` (cycle.ProxyCycle.send), `HttpToolsProtocol.data_received`
  and `.on_url` (limits.py); extended on the assumption of what they do inside:
  `HttpToolsProtocol.on_headers_complete` (builds the cycle by name: `adopt` swaps its class),
  `Server.serve` (enters `capture_signals`, which SignalFreeServer makes a no-op), and the
  protocol factory nested in `Server.startup` (copied by `protocol_factory` for the
  BurstAcceptor);
- protocol attributes read or written: `url`, `headers`, `cycle`, `parser`, `transport`,
  `loop`, `scope`, `connections`, `handle_websocket_upgrade()`; `on_body` and
  `on_message_complete` extended (skipped for a CONNECT); and the private `_unset_keepalive_if_required()`,
  `_should_upgrade()`, `_unsupported_upgrade_warning()`, which `HttpToolsProtocol` here names
  `stop_keepalive_timer`, `upgrade_requested`, `warn_unsupported_upgrade`;
- cycle attributes read or written: `flow` (`write_paused`, `drain()`), `disconnected`,
  `response_started`, `response_complete`, `waiting_for_100_continue`, `default_headers`,
  `chunked_encoding`, `expected_content_length`, `keep_alive`, `scope`, `transport`,
  `message_event`, `on_response`;
- server attributes: `config.http_protocol_class`, `server_state`, `lifespan.state`,
  `servers`, `started`, `should_exit`, `force_exit`.

tests/unit/test_compat_contract.py checks every one against the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornHttpToolsProtocol

__all__ = [
    "REWRITTEN",
    "STATUS_LINE",
    "HttpToolsProtocol",
    "RequestResponseCycle",
    "SignalFreeServer",
    "adopt",
    "protocol_factory",
]

# uvicorn code we rewrote or whose inside we rely on: its qualified name (a nested function
# after the last `.` of a method) -> (sha256 of its source in the tested uvicorn, where our
# version or assumption lives). When the hash changes, re-read both and update the hash.
REWRITTEN: dict[str, tuple[str, str]] = {
    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle.send": (
        "cfc84491029529db3be8833cf904f97a3cb18e0a7fd24199b43e694d59617a00",
        "sidecar/ingress/writer.py ProxyCycle.send, _start, _body",
    ),
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.data_received": (
        "02c2572f1df559070eba7f206a3f7e251782f5af4aaae194fc1ffb67f24c3873",
        "sidecar/ingress/protocol.py LimitedHttpToolsProtocol.data_received",
    ),
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_url": (
        "4670fe11c5fd50283d9bedf18736e4a232aeac6a226c39dbff19d3c0adde20e7",
        "sidecar/ingress/protocol.py LimitedHttpToolsProtocol.on_url",
    ),
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_headers_complete": (
        "7e259152e5aade71beacb5d1b28c319358b2b0e1f3a493655b5c354b5e7d4ef9",
        "sidecar/ingress/protocol.py on_headers_complete and sidecar/_compat/uvicorn.py adopt",
    ),
    "uvicorn.server.Server.serve": (
        "20557f5f925b5a3c755ee419fedf3c1752c3882102fb18e1c034a0c36d655586",
        "sidecar/_compat/uvicorn.py SignalFreeServer.capture_signals",
    ),
    "uvicorn.server.Server.startup.create_protocol": (
        "7d7e25f4d7a8d029cb073acd75cfcaccc611cfd9ffa360765aff7f599de1ccf5",
        "sidecar/_compat/uvicorn.py protocol_factory",
    ),
}


class HttpToolsProtocol(_UvicornHttpToolsProtocol):
    """uvicorn's httptools protocol, with the private methods our rewrite of `data_received`
    calls under names of ours (the same functions: no extra call per read)."""

    stop_keepalive_timer = _UvicornHttpToolsProtocol._unset_keepalive_if_required
    upgrade_requested = _UvicornHttpToolsProtocol._should_upgrade
    warn_unsupported_upgrade = _UvicornHttpToolsProtocol._unsupported_upgrade_warning


class SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to us: one process, two listeners, one drain.

    `Server.serve` wraps its work in `capture_signals()`, which installs uvicorn's handlers.
    """

    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


def protocol_factory(server: uvicorn.Server) -> Callable[[], asyncio.Protocol]:
    """The protocol factory `server.startup` hands to `loop.create_server` (a nested function
    there), for connections accepted outside uvicorn: each is exactly what uvicorn would make."""
    config = server.config
    protocol: Any = config.http_protocol_class  # uvicorn's protocols take these keywords
    return functools.partial(
        protocol, config=config, server_state=server.server_state, app_state=server.lifespan.state)


def adopt(cycle: RequestResponseCycle, cls: type[RequestResponseCycle]) -> None:
    """Make uvicorn's fresh `cycle` an instance of our subclass `cls`.

    uvicorn builds its RequestResponseCycle by name inside `on_headers_complete`; the request's
    task has not run yet, so changing the class there is all it takes. `cls` adds no slots
    and no `__init__`: its own attributes are class-level defaults.
    """
    cycle.__class__ = cls
