"""Structured logging: JSON lines (console rendering on a TTY), configured once at start.

Cost matters: there is one access line per request. structlog's stock chain (ISO
`TimeStamper`, `json.dumps`, a write *and flush* per line) measured 18-28 us a line on the
dev box; with msgspec's encoder, a cached-second timestamp and lines collected in memory
and written in one syscall at most every `FLUSH_INTERVAL` (or at 64 KiB) it is 7-9 us, and
a slow log reader can only stall the loop once per batch, not once per line. On a TTY (a
human watching) every line is written at once. Lines still buffered are written at exit;
a SIGKILL can lose the last `FLUSH_INTERVAL` of them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import IO, Any

import msgspec
import structlog

from sidecar.config import Log

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

FLUSH_INTERVAL = 0.1  # seconds a line may wait in memory
_FLUSH_BYTES = 64 * 1024


class BufferedOutput:
    """Log lines gathered in memory, written by a loop timer (or at once when no loop runs)."""

    def __init__(self, stream: IO[bytes], immediate: bool = False) -> None:
        self.stream = stream
        self.immediate = immediate
        self._parts: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, line: str) -> None:
        self.write_bytes(line.encode("utf-8", "replace"))

    def write_bytes(self, line: bytes) -> None:
        """Add one complete line (newline included), already encoded."""
        self._parts.append(line)
        self._size += len(line)
        if self.immediate or self._size >= _FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # start-up, shutdown, CLI: nobody to flush later
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        # Swap, not clear: a line another thread appends meanwhile lands in the new list.
        parts, self._parts, self._size = self._parts, [], 0
        try:
            self.stream.write(b"".join(parts))
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or broken: logging must never take the proxy down


class _LineLogger:
    """structlog logger that hands rendered lines to the shared output."""

    __slots__ = ("_output",)

    def __init__(self, output: BufferedOutput) -> None:
        self._output = output

    def msg(self, message: str | bytes) -> None:
        # JSON lines arrive as bytes (msgspec's), console lines as str.
        if isinstance(message, bytes):
            self._output.write_bytes(message + b"\n")
        else:
            self._output.write(message + "\n")

    log = debug = info = warn = warning = err = error = critical = exception = msg


class _LineHandler(logging.Handler):
    """Stdlib records (uvicorn's, ours) into the same output, so lines stay in order."""

    def __init__(self, output: BufferedOutput) -> None:
        super().__init__()
        self._output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._output.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


class _Timestamp:
    """`time` as ISO 8601 UTC with milliseconds; the date-and-second part is formatted once a second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event["time"] = self.now()
        return event


_encoder = msgspec.json.Encoder()


def _dumps(event: dict[str, Any], **_: Any) -> bytes:
    try:
        return _encoder.encode(event)
    except TypeError:  # an object msgspec does not know (an exception in a stdlib record)
        return _encoder.encode({k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                                for k, v in event.items()})


def _dumps_text(event: dict[str, Any], **kw: Any) -> str:
    return _dumps(event, **kw).decode()  # stdlib records: logging's Formatter wants str


class JsonSink:
    """Where pre-rendered JSON lines go, for callers that render their own (access_log.py)."""

    __slots__ = ("output", "timestamp")

    def __init__(self, output: BufferedOutput, timestamp: _Timestamp) -> None:
        self.output = output
        self.timestamp = timestamp


_output: BufferedOutput | None = None
_json: tuple[JsonSink, int] | None = None  # the JSON output and the lowest level written; None on a console


def json_sink(level: int) -> JsonSink | None:
    """The JSON-lines output if lines at `level` are written and rendered as JSON, else None."""
    if _json is not None and level >= _json[1]:
        return _json[0]
    return None


def configure(settings: Log, stream: IO[bytes] | None = None) -> None:
    """Route structlog and the stdlib loggers (uvicorn's, ours) to one stream in one format."""
    global _output, _json
    level = _LEVELS[settings.level]
    tty = sys.stdout.isatty()
    console = settings.format == "console" or (settings.format == "auto" and tty)
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer(
        serializer=_dumps)
    text_renderer: Any = renderer if console else structlog.processors.JSONRenderer(serializer=_dumps_text)
    if _output is not None:
        _output.flush()
    output = _output = BufferedOutput(stream or sys.stdout.buffer, immediate=tty)
    atexit.register(output.flush)
    timestamp = _Timestamp()
    _json = None if console else (JsonSink(output, timestamp), level)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=_levelled(level),
        logger_factory=lambda *args: _LineLogger(output),
        cache_logger_on_first_use=True,
    )
    handler = _LineHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, timestamp, text_renderer],
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log is off; ours is one structured line per request.
    logging.getLogger("uvicorn.access").disabled = True


_wrapper: type[Any] | None = None


def _levelled(level: int) -> type[Any]:
    """structlog's filtering bound logger for `level`, as ONE class whose methods are swapped on a
    level change: loggers cached on first use (cache_logger_on_first_use) are instances of it,
    so a reloaded `log.level` reaches them too, and a filtered call stays a no-op method."""
    global _wrapper
    source = structlog.make_filtering_bound_logger(level)
    if _wrapper is None:
        _wrapper = type("LevelledBoundLogger", (source,), {})
    for name, value in vars(source).items():
        if not name.startswith("__"):
            setattr(_wrapper, name, value)
    return _wrapper


def set_level(name: str) -> None:
    """Change the log level of a configured process (config reload): structlog, stdlib, access lines."""
    global _json
    level = _LEVELS[name]
    _levelled(level)
    logging.getLogger().setLevel(level)
    if _json is not None:
        _json = (_json[0], level)


def flush() -> None:
    """Write out buffered lines now (before exit, or before a test reads the stream)."""
    if _output is not None:
        _output.flush()


def get(name: str) -> Any:
    return structlog.get_logger(name)
