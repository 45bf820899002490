"""Request-target forms (RFC 9112 3.2) on both parsers: absolute-form decides by its URI.

absolute-form: the URI's authority is the destination and the upstream Host, whatever the
Host header says (a proxy ignores it, RFC 9112 3.2.2); HTTP/1.0 without Host works; the
sidecar's own listener in absolute-form is a loop. (authority-form: test_connect_*.py.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

from tests.conftest import Sidecar
from tests.e2e.test_errors import assert_error
from tests.e2e.test_transparency import raw_request, split_response
from tests.upstream import Upstream

PARSERS = ["httptools", "h11"]


@pytest.fixture(params=PARSERS)
def any_parser(request: pytest.FixtureRequest, make_sidecar: Callable[..., Sidecar]) -> Sidecar:
    return make_sidecar(listen={"http": request.param})


def test_absolute_form_goes_to_the_uri_host_not_the_host_header(any_parser: Sidecar,
                                                                  fresh_upstream: Upstream) -> None:
    raw = raw_request(any_parser.port, (
        f"GET http://localhost:{fresh_upstream.port}/echo/abs?q=1 HTTP/1.1\r\n"
        "Host: elsewhere.invalid:9\r\nConnection: close\r\n\r\n").encode())
    status, _, body = split_response(raw)
    assert status == 200, body
    echoed = json.loads(body)
    assert echoed["target"] == "/echo/abs?q=1"
    # The upstream recorded the URI's authority as Host; the app's Host header went nowhere.
    [seen] = fresh_upstream.requests
    assert dict(seen.headers)["host"] == f"localhost:{fresh_upstream.port}"
    assert "elsewhere.invalid" not in json.dumps(seen.headers)


def test_http10_absolute_form_without_host_works(any_parser: Sidecar, fresh_upstream: Upstream) -> None:
    raw = raw_request(any_parser.port,
                      f"GET http://localhost:{fresh_upstream.port}/bytes?n=100 HTTP/1.0\r\n\r\n".encode())
    status, _, body = split_response(raw)
    assert (status, len(body)) == (200, 100)
    assert dict(fresh_upstream.requests[0].headers)["host"] == f"localhost:{fresh_upstream.port}"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_absolute_form_for_the_own_listener_is_a_loop(any_parser: Sidecar, host: str) -> None:
    raw = raw_request(any_parser.port, (f"GET http://{host}:{any_parser.port}/ HTTP/1.1\r\n"
                                        f"Host: {host}:{any_parser.port}\r\nConnection: close\r\n\r\n").encode())
    assert_error(any_parser, raw, 508, "loop")


def test_curl_proxy_to_the_sidecar_itself_is_a_loop(any_parser: Sidecar) -> None:
    # Issue 13 point 6: this gave 404 no_route under httptools, which lost the authority.
    result = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", "--noproxy", "", "-x", any_parser.url,
                             f"{any_parser.url}/"], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.startswith("HTTP/1.1 508")
    assert "x-egress-error: loop" in result.stdout


def test_origin_form_still_routes_by_host(any_parser: Sidecar, fresh_upstream: Upstream) -> None:
    raw = raw_request(any_parser.port, (f"GET /echo/o HTTP/1.1\r\nHost: localhost:{fresh_upstream.port}\r\n"
                                        "Connection: close\r\n\r\n").encode())
    status, _, body = split_response(raw)
    assert status == 200 and json.loads(body)["target"] == "/echo/o"
