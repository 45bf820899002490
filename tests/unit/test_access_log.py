"""The access line's fast JSON path writes what structlog's JSON set-up writes, key for key."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest

from sidecar.config import Log
from sidecar.observe import log as log_module
from sidecar.observe.access_log import AccessLog
from sidecar.observe.observer import Exchange

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def configure() -> Iterator[object]:
    def setup(**settings: str) -> io.BytesIO:
        stream = io.BytesIO()
        log_module.configure(Log(**settings), stream=stream)  # type: ignore[arg-type]
        return stream

    yield setup
    log_module.configure(Log(format="json"))


def exchanges() -> list[Exchange]:
    return [
        Exchange(start=1.0, method="GET", path="/repos/x", route="gh", upstream="api.example:443", status=200,
                 request_id=b"abc", sent=1.001, first_event=1.002, connect_start=1.002, connect_end=1.003,
                 tls_start=1.003, tls_end=1.005, headers=1.010, end=1.020, bytes_in=5, bytes_out=7, reused=False),
        Exchange(start=2.0, method="POST", path="/p\u00e9", route="-", upstream="h:8443", status=204, end=2.5,
                 sent=2.1, headers=2.4, reused=True),  # no request id, no connect or TLS step
        Exchange(start=3.0, method="GET", path="/v1/charges", route="pay", upstream="api.pay.test:443", status=200,
                 end=3.1, sent=3.01, headers=3.05, reused=True, intercepted=True),  # decrypted inside a tunnel
    ]


def lines(stream: io.BytesIO) -> list[list[tuple[str, object]]]:
    log_module.flush()
    return [list(json.loads(line).items()) for line in stream.getvalue().splitlines()]


def test_the_fast_line_equals_structlogs_rendering_key_for_key(configure) -> None:  # type: ignore[no-untyped-def]
    stream = configure(format="json")
    access = AccessLog()
    assert access.sink is not None  # JSON output: the fast path is taken
    for exchange in exchanges():
        access.emit(exchange)
    fast = lines(stream)

    stream = configure(format="json")
    access = AccessLog()
    access.sink = None  # the structlog path, as on a console
    for exchange in exchanges():
        access.emit(exchange)
    slow = lines(stream)

    assert len(fast) == len(slow) == 3
    for fast_line, slow_line in zip(fast, slow, strict=True):
        assert [k for k, _ in fast_line] == [k for k, _ in slow_line]
        assert [(k, v) for k, v in fast_line if k != "time"] == [(k, v) for k, v in slow_line if k != "time"]
        assert TIME.match(dict(fast_line)["time"])  # type: ignore[arg-type]
    assert dict(fast[0])["event"] == "access" and dict(fast[0])["tls_ms"] == 2.0
    assert dict(fast[1])["request_id"] is None and dict(fast[1])["path"] == "/p\u00e9"
    assert "intercepted" not in dict(fast[0]) and dict(fast[2])["intercepted"] is True


def test_above_info_no_access_line_is_written(configure) -> None:  # type: ignore[no-untyped-def]
    stream = configure(format="json", level="warning")
    access = AccessLog()
    assert access.sink is None
    access.emit(exchanges()[0])
    assert lines(stream) == []


def test_console_output_renders_through_structlog(configure) -> None:  # type: ignore[no-untyped-def]
    stream = configure(format="console")
    access = AccessLog()
    assert access.sink is None
    access.emit(exchanges()[0])
    log_module.flush()
    text = stream.getvalue().decode()
    assert "access" in text and "route=gh" in text and not text.startswith("{")
