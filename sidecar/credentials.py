"""Values of headers a route injects upstream (literal, or a secret read from a file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sidecar.config import HeaderValue


def header_provider(source: HeaderValue) -> Callable[[], bytes]:
    """A cheap callable returning the header's current value as bytes."""
    if source.value is not None:
        value = source.template.replace("{}", source.value).encode("latin-1")
    else:
        assert source.file is not None
        secret = Path(source.file).read_text().strip()
        value = source.template.replace("{}", secret).encode("latin-1")
    return lambda: value
