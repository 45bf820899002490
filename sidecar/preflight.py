"""The one validation `run` and `check-config` share: the config, then every file it names.

`config.load` checks the config as data (types, ranges, keys that contradict each other);
this module then opens what the config points at on disk - CA bundles, client certificates
and keys, secret files - the way start-up will use them, so a file that would stop the
sidecar stops `check-config` too, with one line naming the key and the path rather than a
traceback from deep inside `ssl` (`FileNotFoundError` with no file named, `[SSL] PEM lib`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping
from typing import NoReturn

from sidecar.config import TLS, Config, ConfigError, load
from sidecar.proxy.credentials import CredentialError, header_source


def load_checked(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The effective config (`config.load`), with every file it names checked; ConfigError if not usable."""
    config = load(path, environ)
    check_files(config)
    return config


def check_files(config: Config) -> None:
    """Raise ConfigError, naming the key and the path, for the first named file start-up could not use."""
    for key, tls in tls_sections(config):
        check_tls_files(key, tls)
    for index, route in enumerate(config.routes):
        for name, spec in route.headers.items():
            if spec.file is None:
                continue
            try:
                header_source(name, spec, route=route.name)  # reads and renders it, as start-up does
            except CredentialError as exc:
                _fail(f"routes[{index}].headers.{name}.file", str(exc))


def tls_sections(config: Config) -> Iterator[tuple[str, TLS]]:
    """(key, TLS settings) of the global `tls` and each route's own `tls`."""
    yield "tls", config.tls
    for index, route in enumerate(config.routes):
        if route.tls is not None:
            yield f"routes[{index}].tls", route.tls


def check_tls_files(key: str, tls: TLS) -> None:
    """The CA bundle holds a certificate; the client certificate loads with its key, and they match."""
    for field in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, field)
        if path is not None:
            _readable(f"{key}.{field}", path)
    if tls.ca_file is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError:
            _fail(f"{key}.ca_file", f"{tls.ca_file} holds no PEM certificate")
    if tls.cert_file is None:
        return
    try:  # a certificate file is a CA bundle's format: this finds whether it holds one
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=tls.cert_file)
    except ssl.SSLError:
        _fail(f"{key}.cert_file", f"{tls.cert_file} holds no PEM certificate")
    key_path = tls.key_file or tls.cert_file
    if b"PRIVATE KEY-----" not in _head(key_path):
        if tls.key_file is None:
            _fail(f"{key}.cert_file", f"{tls.cert_file} holds no private key; set {key}.key_file")
        _fail(f"{key}.key_file", f"{tls.key_file} holds no PEM private key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except _EncryptedKey:
        _fail(f"{key}.{'key_file' if tls.key_file else 'cert_file'}",
              f"{key_path} is an encrypted key; the sidecar needs it unencrypted")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            _fail(f"{key}.key_file" if tls.key_file else f"{key}.cert_file",
                  f"the key in {key_path} does not match the certificate in {tls.cert_file}")
        _fail(f"{key}.{'key_file' if tls.key_file else 'cert_file'}",
              f"{key_path} cannot be loaded with {tls.cert_file}: {exc.reason or exc}")


class _EncryptedKey(Exception):
    """OpenSSL asked for a pass phrase (raised from the callback, so it never prompts on a TTY)."""


def _no_password() -> str:
    raise _EncryptedKey


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        _fail(key, f"cannot read {path}: {exc.strerror}")


def _head(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read(1 << 20)


def _fail(key: str, problem: str) -> NoReturn:
    raise ConfigError(f"invalid config: {problem} - at `$.{key}`")
