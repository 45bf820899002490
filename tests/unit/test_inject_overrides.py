"""Per-pod annotation parsing: every bad value is refused with the annotation's name."""

from __future__ import annotations

import pytest

from sidecar.inject.overrides import InjectError, parse


def test_no_annotations_means_no_overrides() -> None:
    over = parse({"unrelated/thing": "x"})
    assert over.image is None and over.resources == () and not over.set_proxy_env and over.unknown == ()


def test_valid_annotations_are_parsed() -> None:
    over = parse(
        {
            "egress-sidecar.io/cpu-limit": "2",
            "egress-sidecar.io/memory-request": "1.5Gi",
            "egress-sidecar.io/drain-grace": "1m",
            "egress-sidecar.io/set-proxy-env": "true",
            "egress-sidecar.io/no-proxy": " a.example ,,b ",
        }
    )
    assert set(over.resources) == {("limits", "cpu", "2"), ("requests", "memory", "1.5Gi")}
    assert over.drain_grace == "1m" and over.drain_grace_seconds == 60.0
    assert over.set_proxy_env and over.no_proxy == ("a.example", "b")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("egress-sidecar.io/cpu-request", "lots"),
        ("egress-sidecar.io/memory-limit", "128 Mi"),
        ("egress-sidecar.io/listen-port", "0"),
        ("egress-sidecar.io/admin-port", "70000"),
        ("egress-sidecar.io/admin-port", "http"),
        ("egress-sidecar.io/drain-grace", "soon"),
        ("egress-sidecar.io/config-map", "Not_A_Name"),
        ("egress-sidecar.io/image", "has space:1"),
        ("egress-sidecar.io/image", ""),
        ("egress-sidecar.io/set-proxy-env", "yes"),
        ("egress-sidecar.io/set-https-proxy", "off"),
    ],
)
def test_bad_values_name_the_annotation(key: str, value: str) -> None:
    with pytest.raises(InjectError, match=key):
        parse({key: value})


def test_non_string_annotation_value_is_refused() -> None:
    with pytest.raises(InjectError, match="must be a string"):
        parse({"egress-sidecar.io/image": 3})


def test_unknown_annotations_under_our_prefix_are_reported_not_refused() -> None:
    assert parse({"egress-sidecar.io/imgae": "x"}).unknown == ("egress-sidecar.io/imgae",)
