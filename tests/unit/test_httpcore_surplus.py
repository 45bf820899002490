"""Contract: the httpcore internals sidecar/httpcore_surplus.py patches. If an httpcore
upgrade moves them, re-read httpcore/_async/http11.py and that module."""

from __future__ import annotations

import inspect

import httpcore
from httpcore._async.http11 import AsyncHTTP11Connection

from sidecar import httpcore_surplus


def test_httpcore_http11_response_closed_is_where_the_patch_expects_it() -> None:
    assert httpcore.__version__.startswith("1.0."), httpcore.__version__
    source = inspect.getsource(httpcore_surplus._ORIGINAL)
    assert "self._h11_state.start_next_cycle()" in source
    assert "async with self._state_lock:" in source
    assert "_h11_state" in inspect.getsource(AsyncHTTP11Connection.__init__)


def test_install_is_idempotent_and_keeps_the_original_for_clean_responses() -> None:
    httpcore_surplus.install()
    httpcore_surplus.install()
    assert AsyncHTTP11Connection._response_closed is httpcore_surplus._response_closed
    assert httpcore_surplus._ORIGINAL is not httpcore_surplus._response_closed
