"""Headers a route injects: literal values, and secrets read from mounted files.

A Kubernetes Secret volume is a directory of symlinks: `token -> ..data/token`,
`..data -> ..2026_11_25_18_00_00.123`. On rotation the kubelet writes a new timestamped
directory and atomically renames a new `..data` symlink over the old one
(kubernetes/pkg/volume/util/atomic_writer.go). So the file is re-read when `stat` of the
path (following the links) shows another file (device, inode) or another size or mtime,
and that `stat` runs at most once per `interval` (1 s), on the request that finds the
interval passed: no read per request, no restart, no background task to manage.

The secret value never leaves this module except as the header value: `repr`, errors and
log lines name the file, never its content; `redact` hides literal values from `/config`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from sidecar.config import ConfigError, HeaderValue, Route

HeaderSource = Callable[[], bytes]
InjectedHeader = tuple[bytes, HeaderSource]  # (lower-case name, value getter)

REDACTED = "<redacted>"

_log = structlog.get_logger("egress.credentials")

# Bytes a header value must not hold (RFC 9110 5.5): CR, LF, NUL and other controls but HTAB.
_FORBIDDEN = frozenset(range(0x20)) - {0x09} | {0x7F}


class CredentialError(ConfigError):
    """A secret cannot be used; the message names the file and the problem, never the content.

    At start this stops the sidecar like any config error (exit 2, one line on stderr).
    """


def render(template: str, secret: bytes, where: str) -> bytes:
    """The header value: `template` with `{}` replaced by the secret, checked for header safety."""
    secret = secret.strip(b" \t\r\n")
    if not secret:
        raise CredentialError(f"{where} is empty")
    if any(byte in _FORBIDDEN for byte in secret):
        # A newline inside a secret would split the header: refuse rather than inject.
        raise CredentialError(f"{where} holds control characters, which a header value cannot carry")
    try:
        head, tail = template.encode("latin-1").split(b"{}", 1)
    except (UnicodeEncodeError, ValueError):
        raise CredentialError(f"the template for {where} must be Latin-1 text containing {{}}") from None
    return head + secret + tail


class SecretFile:
    """A header value from a mounted secret file; callable, cheap, re-read when the file changes."""

    __slots__ = ("_clock", "_failing", "_interval", "_key", "_next_check", "_path", "_template", "_value")

    def __init__(
        self,
        path: str,
        template: str = "{}",
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._template = template
        self._interval = interval
        self._clock = clock
        self._failing = False
        # At start the secret must be readable: a sidecar that would send requests without
        # their credentials is worse than one that does not start.
        try:
            self._key = self._stat_key()
            self._value = self._read()
        except OSError as exc:
            raise CredentialError(f"cannot read secret file {path}: {exc.strerror}") from None
        self._next_check = clock() + interval

    def __repr__(self) -> str:
        return f"SecretFile(path={self._path!r}, value={REDACTED})"

    def __call__(self) -> bytes:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._interval
            self._refresh()
        return self._value

    def _stat_key(self) -> tuple[int, int, int, int]:
        stat = os.stat(self._path)  # follows `token -> ..data/token -> ..<ts>/token`
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _read(self) -> bytes:
        with open(self._path, "rb") as file:
            return render(self._template, file.read(65536), f"secret file {self._path}")

    def _refresh(self) -> None:
        try:
            key = self._stat_key()
            if key == self._key:
                return
            value = self._read()
        except (OSError, CredentialError) as exc:
            # Mid-rotation or a broken mount: keep sending the last good value, say so once.
            if not self._failing:
                self._failing = True
                problem = exc.strerror if isinstance(exc, OSError) else str(exc)
                _log.warning("secret file unreadable; keeping the last value", path=self._path, error=problem)
            return
        self._value, self._key, self._failing = value, key, False
        _log.info("secret file changed; new value in use", path=self._path)


def header_source(name: str, spec: HeaderValue, *, route: str = "") -> HeaderSource:
    """The value getter for one configured header."""
    if spec.file is not None:
        return SecretFile(spec.file, spec.template)
    assert spec.value is not None  # config validation: exactly one of value/file
    where = f"route {route!r} header {name}"
    try:
        raw = spec.value.encode("latin-1")
    except UnicodeEncodeError:
        raise CredentialError(f"{where} must be Latin-1 text") from None
    value = render(spec.template, raw, where)
    return lambda: value


def injected_headers(route: Route) -> tuple[InjectedHeader, ...]:
    """The headers `route` injects, as (lower-case name, getter) pairs; built once at start.

    The request builder drops any header of the same name the app sent: the route's value
    replaces it, it is never merged or duplicated.
    """
    return tuple(
        (name.lower().encode("latin-1"), header_source(name, spec, route=route.name))
        for name, spec in route.headers.items()
    )


def redact(config_builtins: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config.to_builtins(config)` safe to show on `/config`: literal header values hidden.

    File-based values show the path and template (no secret is in config); literal values
    may themselves be API keys, so they are replaced.
    """
    shown = copy.deepcopy(dict(config_builtins))
    for route in shown.get("routes") or []:
        for spec in (route.get("headers") or {}).values():
            if isinstance(spec, dict) and spec.get("value") is not None:
                spec["value"] = REDACTED
    return shown
