"""Credential injection: secret files re-read on the kubelet's symlink swap, never leaked."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar import config as config_module
from sidecar.proxy.credentials import REDACTED, CredentialError, SecretFile, injected_headers, redact, render
from tests.k8s_secret import create_secret_volume, rotate_secret_volume


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_template_wraps_the_stripped_secret() -> None:
    assert render("Bearer {}", b"tok-1\n", "x") == b"Bearer tok-1"


@pytest.mark.parametrize("secret", [b"a\r\nX-Evil: 1", b"a\x00b", b"", b" \n"])
def test_secrets_that_would_break_the_header_are_refused_without_echoing_them(secret: bytes) -> None:
    with pytest.raises(CredentialError) as info:
        render("Bearer {}", secret, "secret file /s")
    assert "/s" in str(info.value)
    if secret.strip():
        assert secret.decode() not in str(info.value)


def test_symlink_swap_is_picked_up_after_the_check_interval_without_reading_per_call(tmp_path: Path) -> None:
    volume = tmp_path / "github"
    create_secret_volume(volume, {"token": "old-token\n"})
    clock = Clock()
    source = SecretFile(str(volume / "token"), "Bearer {}", interval=1.0, clock=clock)
    assert source() == b"Bearer old-token"

    rotate_secret_volume(volume, {"token": "new-token\n"})
    clock.now += 0.5
    assert source() == b"Bearer old-token"  # within the interval: no stat, no read
    clock.now += 0.6
    assert source() == b"Bearer new-token"


def test_in_place_rewrite_is_picked_up_too(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one")
    clock = Clock()
    source = SecretFile(str(path), "{}", clock=clock)
    path.write_text("two-longer")
    clock.now += 2
    assert source() == b"two-longer"


def test_a_vanished_or_broken_file_keeps_the_last_good_value(tmp_path: Path) -> None:
    volume = tmp_path / "s"
    create_secret_volume(volume, {"token": "good"})
    clock = Clock()
    source = SecretFile(str(volume / "token"), clock=clock)
    (volume / "token").unlink()
    clock.now += 2
    assert source() == b"good"
    (volume / "token").symlink_to("..data/token")
    rotate_secret_volume(volume, {"token": "bad\r\nx"})
    clock.now += 2
    assert source() == b"good"
    rotate_secret_volume(volume, {"token": "better"})
    clock.now += 2
    assert source() == b"better"


def test_missing_secret_at_start_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="missing-token"):
        SecretFile(str(tmp_path / "missing-token"))


def test_repr_never_shows_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cr3t-value")
    source = SecretFile(str(path))
    assert "s3cr3t-value" not in repr(source)


def config_with_headers(tmp_path: Path) -> config_module.Config:
    path = tmp_path / "token"
    path.write_text("file-secret")
    return config_module.from_mapping({
        "routes": [{
            "name": "github", "prefix": "/github", "upstream": "https://api.github.com",
            "headers": {
                "Authorization": {"file": str(path), "template": "Bearer {}"},
                "X-Api-Key": {"value": "literal-secret"},
            },
        }],
    })


def test_injected_headers_are_lower_case_name_and_getter(tmp_path: Path) -> None:
    config = config_with_headers(tmp_path)
    headers = {name: get() for name, get in injected_headers(config.routes[0])}
    assert headers == {b"authorization": b"Bearer file-secret", b"x-api-key": b"literal-secret"}


def test_redact_hides_literal_values_and_keeps_file_paths(tmp_path: Path) -> None:
    config = config_with_headers(tmp_path)
    raw = config_module.to_builtins(config)
    shown = redact(raw)
    text = repr(shown)
    assert "literal-secret" not in text and "file-secret" not in text
    assert shown["routes"][0]["headers"]["X-Api-Key"]["value"] == REDACTED
    assert shown["routes"][0]["headers"]["Authorization"]["file"] == str(tmp_path / "token")
    assert raw["routes"][0]["headers"]["X-Api-Key"]["value"] == "literal-secret"  # input untouched
