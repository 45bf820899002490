"""httpx internals the data path uses to skip re-normalising what is already normal.

Touches (httpx 0.28; re-read `httpx/_models.py`, `_urls.py`, `_urlparse.py`, `_content.py`):
- `httpx._urlparse.ParseResult` and `URL._uri_reference`: a URL made from already-parsed
  parts, so the app's raw path and query go out byte for byte (httpx's parser would
  percent-encode some bytes) and nothing is parsed twice (`raw_url`);
- `Request.__new__` then `method`, `url`, `headers`, `extensions`, `stream` (`build_request`);
- `Response.__new__` then every attribute `Response.__init__` sets, `_request` and
  `_num_bytes_downloaded` among them (`build_response`);
- `Headers.__new__` then `_list` (raw name, lower-case name, value) and `_encoding`;
- `ByteStream._stream`: the bytes of an in-memory body (`in_memory_body`).

tests/unit/test_compat_contract.py checks each built object equals the constructor's,
attribute for attribute.
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx._urlparse import ParseResult


def raw_url(scheme: str, host: str, port: int | None, path: str, query: str | None) -> httpx.URL:
    """An `httpx.URL` of these parts as they are: nothing parsed, quoted or normalised.

    `host` without brackets (IPv6) and lower-case; `port` None for the scheme's default.
    """
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = ParseResult(scheme, "", host, port, path, query, None)
    return url


def _headers(items: list[tuple[bytes, bytes, bytes]]) -> httpx.Headers:
    headers = httpx.Headers.__new__(httpx.Headers)
    headers._list = items
    headers._encoding = None
    return headers


def build_request(
    method: str,
    url: httpx.URL,
    headers: list[tuple[bytes, bytes]],
    stream: httpx.AsyncByteStream,
    extensions: dict[str, Any],
) -> httpx.Request:
    """An `httpx.Request` without re-normalising what the server already normalised.

    uvicorn hands header names lower-cased as bytes and the header rules only add lower-case
    names, so httpx's per-header normalisation (about 5 µs a request) would change nothing.
    """
    request = httpx.Request.__new__(httpx.Request)
    request.method = method
    request.url = url
    request.headers = _headers([(name, name, value) for name, value in headers])
    request.extensions = extensions
    request.stream = stream
    return request


def build_response(
    status: int, headers: list[tuple[bytes, bytes]], stream: httpx.AsyncByteStream, extensions: dict[str, Any],
) -> httpx.Response:
    """The `httpx.Response(status, headers=..., stream=..., extensions=...)` the constructor would
    build, without its per-header normalisation (~3 us for ten headers): httptools hands names and
    values as bytes, so only the lower-cased name is missing."""
    response = httpx.Response.__new__(httpx.Response)
    response.status_code = status
    response.headers = _headers([(name, name.lower(), value) for name, value in headers])
    response._request = None
    response.next_request = None
    response.extensions = extensions
    response.history = []
    response.is_closed = False
    response.is_stream_consumed = False
    response.default_encoding = "utf-8"
    response.stream = stream
    response._num_bytes_downloaded = 0
    return response


def in_memory_body(stream: object) -> bytes | None:
    """The body when it is already bytes in memory (httpx.ByteStream), else None.

    httpx builds a ByteStream for `content=bytes` and for no content at all; reading its
    bytes directly lets head and body leave in one write and makes the body replayable.
    """
    if type(stream) is httpx.ByteStream:
        data = getattr(stream, "_stream", None)
        if isinstance(data, bytes):
            return data
    return None
