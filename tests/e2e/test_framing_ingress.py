"""Request framing through the real sidecar, on both parsers (`listen.http`: httptools, h11).

Raw-socket clients send what no client library would: both Content-Length and
Transfer-Encoding, unknown transfer codings, look-alike framing headers, the smuggling
collections' vectors. Each refusal is a clean error in the sidecar's format, the connection
is closed, nothing of it (nor anything after it) reaches the upstream, and the next request
on a fresh connection is served.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
import trustme

from tests.conftest import Sidecar, base_config, server_context, start_sidecar
from tests.e2e.framing_support import Exchange, exchange
from tests.e2e.smuggling_vectors import CLOSED, VECTORS, Vector, payload
from tests.processes import stop_process
from tests.prometheus import samples, scrape, total
from tests.upstream import Upstream, UpstreamServer, wait_until

PARSERS = ["httptools", "h11"]


@pytest.fixture(scope="module")
def catcher(ca: trustme.CA) -> Iterator[Upstream]:
    """The upstream of this module's sidecars: it records every connection and request."""
    server = UpstreamServer(server_context(ca))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="module")
def sidecars(ca_file: str, catcher: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Sidecar]]:
    """One sidecar per parser, both routing /up to the catcher."""
    started: dict[str, Sidecar] = {}
    try:
        for parser in PARSERS:
            config = base_config(ca_file, listen={"http": parser},
                                 routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{catcher.port}"}])
            started[parser] = start_sidecar(tmp_path_factory.mktemp(parser), config)
        yield started
    finally:
        for sidecar in started.values():
            stop_process(sidecar.proc)


def _tag() -> str:
    return uuid.uuid4().hex[:12]


def _seen(upstream: Upstream, tag: str) -> list[str]:
    return [seen.target for seen in upstream.requests if f"/{tag}/" in seen.target]


def _next_request_is_served(sidecar: Sidecar, upstream: Upstream) -> None:
    tag = _tag()
    with httpx.Client(timeout=10) as client:
        response = client.post(f"{sidecar.url}/up/echo/{tag}/after", content=b"12345")
    assert response.status_code == 200, response.text
    assert response.json()["body_size"] == 5
    assert _seen(upstream, tag) == [f"/echo/{tag}/after"]


def _assert_refused(done: Exchange, kind: str) -> None:
    status = {"bad_request": 400, "unsupported": 501}[kind]
    assert not done.reset, "the refusal must reach the client (lingering close), not a reset"
    assert [answer.status for answer in done.answers] == [status], done.answers
    answer = done.answers[0]
    assert answer.headers[b"x-egress-error"] == kind.encode()
    assert answer.headers[b"connection"] == b"close"
    assert answer.body.startswith(f"egress-sidecar: {kind}: ".encode())
    assert done.closed, "the sidecar must close the connection after the refusal"


def _error_count(sidecar: Sidecar, kind: str) -> float:
    return total(samples(scrape(sidecar.admin_url)), "egress_errors_total", kind=kind)


# ---- CL + TE ---------------------------------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_content_length_with_transfer_encoding_is_refused_and_nothing_after_it_forwarded(
    sidecars: dict[str, Sidecar], catcher: Upstream, parser: str
) -> None:
    sidecar = sidecars[parser]
    tag = _tag()
    host = f"127.0.0.1:{sidecar.port}"
    smuggled = f"GET /up/echo/{tag}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    body = b"0\r\n\r\n" + smuggled
    request = (f"POST /up/echo/{tag}/first HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode() + body
    errors_before = _error_count(sidecar, "bad_request")

    done = exchange(sidecar.port, request)

    _assert_refused(done, "bad_request")
    assert _seen(catcher, tag) == []  # neither the request nor what followed its chunked end
    line = sidecar.wait_log(lambda e: e.get("kind") == "bad_request" and tag in str(e.get("path", "")))
    assert line["status"] == 400
    assert _error_count(sidecar, "bad_request") == errors_before + 1
    _next_request_is_served(sidecar, catcher)
    assert _seen(catcher, tag) == []


@pytest.mark.parametrize("parser", PARSERS)
def test_transfer_encoding_in_http10_is_refused(sidecars: dict[str, Sidecar], catcher: Upstream, parser: str) -> None:
    # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    sidecar = sidecars[parser]
    tag = _tag()
    request = (f"POST /up/echo/{tag}/first HTTP/1.0\r\nHost: 127.0.0.1:{sidecar.port}\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /up/echo/{tag}/smuggled HTTP/1.1\r\n"
               "Host: x\r\n\r\n").encode()
    _assert_refused(exchange(sidecar.port, request), "bad_request")
    assert _seen(catcher, tag) == []
    _next_request_is_served(sidecar, catcher)


# ---- unknown transfer codings -------------------------------------------------------------------

CODINGS = [b"xchunked", b"gzip, chunked", b"chunked, identity", b"identity", b"chunked\r\nTransfer-Encoding: chunked"]


@pytest.mark.parametrize("parser", PARSERS)
def test_unknown_transfer_codings_get_501_and_nothing_reaches_the_upstream(
    make_sidecar: object, fresh_upstream: Upstream, parser: str
) -> None:
    sidecar = make_sidecar(listen={"http": parser},  # type: ignore[operator]
                           routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{fresh_upstream.port}"}])
    for coding in CODINGS:
        request = (f"POST /up/echo HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\n".encode()
                   + b"Transfer-Encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                   + b"GET /up/echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
        done = exchange(sidecar.port, request)
        _assert_refused(done, "unsupported")
    # Refused before routing: the upstream never saw a connection, let alone a request.
    assert fresh_upstream.connections == 0
    assert fresh_upstream.requests == []
    assert _error_count(sidecar, "unsupported") == len(CODINGS)
    _next_request_is_served(sidecar, fresh_upstream)


# ---- look-alikes and Content-Length spelling -------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
def test_framing_look_alikes_are_not_forwarded_and_content_length_goes_normalised(
    sidecars: dict[str, Sidecar], catcher: Upstream, parser: str
) -> None:
    sidecar = sidecars[parser]
    tag = _tag()
    request = (f"POST /up/echo/{tag} HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\nContent-Length: 0005\r\n"
               "Transfer_Encoding: chunked\r\nCONTENT_LENGTH: 99\r\ncontent_length: 0\r\nX_Kept: yes\r\n"
               "Connection: close\r\n\r\nhello").encode()
    done = exchange(sidecar.port, request)
    assert [answer.status for answer in done.answers] == [200]
    echo = json.loads(done.answers[0].body)
    names = [name.lower() for name, _ in echo["headers"]]
    assert "transfer_encoding" not in names and "content_length" not in names
    assert "transfer-encoding" not in names
    assert ["content-length", "5"] in echo["headers"]  # not "0005": some back ends read octal
    assert names.count("content-length") == 1
    assert ["x_kept", "yes"] in echo["headers"]  # other underscored names pass
    assert echo["body_size"] == 5


# ---- h11's errors in the sidecar's format ---------------------------------------------------------

MALFORMED = {
    "invalid-header-line": b"GET /up/x HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
    "bare-lf": b"GET /up/x HTTP/1.1\nHost: a\n\n",
    "obs-fold": b"GET /up/x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n",
}


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_unparsable_requests_get_the_sidecars_error_format_on_both_parsers(
    sidecars: dict[str, Sidecar], catcher: Upstream, parser: str, case: str
) -> None:
    sidecar = sidecars[parser]
    before = _error_count(sidecar, "bad_request")
    requests_before = len(catcher.requests)
    seen_details = {e.get("detail") for e in sidecar.logs() if e.get("event") == "egress_error"}
    done = exchange(sidecar.port, MALFORMED[case])
    _assert_refused(done, "bad_request")
    wait_until(lambda: _error_count(sidecar, "bad_request") == before + 1, timeout=5, message="bad_request counted")
    line = sidecar.wait_log(lambda e: e.get("event") == "egress_error" and e.get("kind") == "bad_request"
                            and e.get("detail") not in seen_details)
    assert line["status"] == 400
    assert not [e for e in sidecar.logs() if "Invalid HTTP request" in e.get("event", "")]  # ours, once
    assert len(catcher.requests) == requests_before


@pytest.mark.parametrize("parser", PARSERS)
def test_an_oversized_head_gets_431_in_the_sidecars_format_on_both_parsers(
    sidecars: dict[str, Sidecar], parser: str
) -> None:
    sidecar = sidecars[parser]
    request = f"GET /up/x HTTP/1.1\r\nHost: 127.0.0.1:{sidecar.port}\r\nX-Big: {'b' * (300 << 10)}\r\n\r\n"
    done = exchange(sidecar.port, request.encode())
    assert [answer.status for answer in done.answers] == [431]
    assert done.answers[0].headers[b"x-egress-error"] == b"header_too_large"
    assert done.closed


# ---- the collections' vectors, both parsers ------------------------------------------------------


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("vector", VECTORS, ids=[vector.id for vector in VECTORS])
def test_smuggling_vector_smuggles_nothing(
    sidecars: dict[str, Sidecar], catcher: Upstream, parser: str, vector: Vector
) -> None:
    sidecar = sidecars[parser]
    tag = _tag()
    data, length = payload(vector, tag, f"127.0.0.1:{sidecar.port}")

    done = exchange(sidecar.port, data)

    statuses = [answer.status for answer in done.answers]
    assert not any(status >= 500 and status != 501 for status in statuses), done.answers
    refused = vector.answer(parser)
    if refused == CLOSED:
        # The body was already streaming upstream when its chunk syntax failed.
        assert done.answers == [] and done.closed and not done.reset
        assert _seen(catcher, tag) in ([], [f"/echo/{tag}/first"])
    elif refused is not None:
        _assert_refused(done, refused)
        assert _seen(catcher, tag) == []
    else:
        # One request framed by its Content-Length, then the marker: the smuggled request
        # stayed inside the first one's body.
        assert statuses == [200, 200], done.answers
        assert json.loads(done.answers[0].body)["body_size"] == length
        assert _seen(catcher, tag) == [f"/echo/{tag}/first", f"/echo/{tag}/marker"]
        assert done.closed
    _next_request_is_served(sidecar, catcher)
    assert not any(target.endswith("/smuggled") for target in _seen(catcher, tag))
    assert [e for e in sidecar.logs() if e.get("kind") == "internal" or e.get("level") == "error"] == []
