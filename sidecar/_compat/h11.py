"""h11 and uvicorn's h11 protocol: what the h11 listener (`listen.http: h11`, h11_protocol.py) touches.

Touches (h11 0.16, uvicorn 0.55; re-read `h11/_connection.py`, `h11/_receivebuffer.py` and
`uvicorn/protocols/http/h11_impl.py`):
- `H11Protocol`, subclassed: its `__init__` builds `self.conn`, its `handle_events` catches
  `h11.RemoteProtocolError` from `conn.next_event()` and calls `send_400_response(msg)`;
- `h11.Connection._receive_buffer`: the bytes received and not yet parsed (`buffered`), read
  in place (`trailing_data` would copy them for every pipelined request).

Imported only with the h11 listener: the run path does not load h11 otherwise.
tests/unit/test_framing.py checks both against the installed versions.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["H11Protocol", "buffered"]


def buffered(conn: h11.Connection) -> bytearray:
    """The bytes `conn` has received and not parsed yet, without a copy."""
    data: bytearray = conn._receive_buffer._data
    return data
