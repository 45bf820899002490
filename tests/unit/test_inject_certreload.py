"""Certificate reload decisions: only on change, and a broken pair keeps the old certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

from sidecar.inject.certreload import CertReloader


def test_reload_only_when_files_change_and_survive_a_half_written_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issued = trustme.CA().issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    events: list[str | None] = []
    reloader = CertReloader(str(cert), str(key), events.append)
    reloader.attach(context)
    assert reloader.check() is False and events == []

    other = trustme.CA().issue_cert("127.0.0.1")
    other.cert_chain_pems[0].write_to_path(str(cert))  # the key is not updated yet: a mismatch
    assert reloader.check() is False
    assert len(events) == 1 and events[0] is not None
    assert reloader.check() is False and len(events) == 1  # no retry storm until the files change again

    other.private_key_pem.write_to_path(str(key))
    assert reloader.check() is True and events[-1] is None


def test_nothing_happens_before_the_server_context_is_attached(tmp_path: Path) -> None:
    events: list[str | None] = []
    reloader = CertReloader(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"), events.append)
    (tmp_path / "missing.crt").write_text("x")
    assert reloader.check() is False and events == []
