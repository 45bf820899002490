"""One structured line per request: every field, no query string, no secret, errors always logged."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import Sidecar
from tests.servers.upstream import Upstream

SECRET = "s3cr3t"
FIELDS = {"time", "level", "event", "request_id", "route", "upstream", "method", "path", "status", "kind",
          "duration_ms", "headers_ms", "pool_wait_ms", "connect_ms", "tls_ms", "bytes_in", "bytes_out", "reused"}


def secret_sidecar(make_sidecar: Callable[..., Sidecar], upstream: Upstream, **overrides: Any) -> Sidecar:
    return make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}",
                                 "headers": {"Authorization": {"value": SECRET, "template": "Bearer {}"}}}],
                        **overrides)


def test_access_line_has_every_field_and_no_query_or_secret(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream
) -> None:
    sidecar = secret_sidecar(make_sidecar, upstream)
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        first = client.post("/up/echo?token=qs-value&page=2", content=b"12345", headers={"x-request-id": "req-1"})
        second = client.get("/up/bytes?n=777&sig=qs-sig")
    assert first.status_code == 200 and second.status_code == 200
    # The secret was injected upstream (so it was in the sidecar's hands) ...
    assert ["authorization", f"Bearer {SECRET}"] in first.json()["headers"]
    generated = dict(upstream.requests[-1].headers)["x-request-id"]

    one = sidecar.wait_log(lambda e: e.get("event") == "access" and e.get("request_id") == "req-1")
    two = sidecar.wait_log(lambda e: e.get("event") == "access" and e.get("request_id") == generated)
    assert FIELDS <= set(one) and FIELDS <= set(two)
    assert (one["route"], one["upstream"], one["method"], one["path"], one["status"], one["kind"]) == (
        "up", f"localhost:{upstream.port}", "POST", "/echo", 200, None)
    assert (one["bytes_in"], one["bytes_out"]) == (5, len(first.content))
    assert two["path"] == "/bytes" and two["bytes_out"] == 777
    # The first request opened the connection (connect and TLS timed), the second reused it.
    assert one["reused"] is False and one["connect_ms"] > 0 and one["tls_ms"] > 0
    assert two["reused"] is True and two["connect_ms"] is None and two["tls_ms"] is None
    for line in (one, two):
        assert line["duration_ms"] >= line["headers_ms"] >= line["pool_wait_ms"] >= 0
        assert line["level"] == "info" and line["time"].endswith("Z")

    # ... and appears nowhere in the log or on /config; neither does any query string.
    text = sidecar.log_path.read_text()
    assert SECRET not in text and "qs-value" not in text and "qs-sig" not in text
    assert all("?" not in e["path"] for e in sidecar.logs() if e.get("event") == "access")
    config = httpx.get(f"{sidecar.admin_url}/config").text
    assert SECRET not in config
    assert json.loads(config)["routes"][0]["headers"]["Authorization"]["template"] == "Bearer {}"


def test_an_error_is_one_warning_line_with_the_same_fields(sidecar: Sidecar) -> None:
    response = httpx.get(f"{sidecar.url}/nothing?key=qs-key", headers={"x-request-id": "req-err"}, timeout=10)
    assert response.status_code == 404
    line = sidecar.wait_log(lambda e: e.get("request_id") == "req-err")
    assert line["event"] == "egress_error" and line["level"] == "warning"
    assert FIELDS <= set(line) and line["kind"] == "no_route" and line["status"] == 404
    assert line["path"] == "/nothing" and "qs-key" not in sidecar.log_path.read_text()
    assert [e for e in sidecar.logs() if e.get("request_id") == "req-err"] == [line]


def test_access_log_off_still_logs_errors(make_sidecar: Callable[..., Sidecar], upstream: Upstream) -> None:
    sidecar = secret_sidecar(make_sidecar, upstream, log={"access": False})
    with httpx.Client(base_url=sidecar.url, timeout=10) as client:
        assert client.get("/up/echo", headers={"x-request-id": "ok-1"}).status_code == 200
        assert client.get("/nothing", headers={"x-request-id": "bad-1"}).status_code == 404
    sidecar.wait_log(lambda e: e.get("request_id") == "bad-1" and e.get("event") == "egress_error")
    # Lines are written in order, so the success's line would be in the file by now.
    assert not [e for e in sidecar.logs() if e.get("request_id") == "ok-1"]


def test_startup_logs_the_effective_config_without_secrets(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream
) -> None:
    sidecar = secret_sidecar(make_sidecar, upstream)
    line = sidecar.wait_log(lambda e: e.get("event") == "config")
    assert line["config"]["routes"][0]["name"] == "up"
    assert SECRET not in sidecar.log_path.read_text()
