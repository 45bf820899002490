"""Placeholder until main's shared fixtures land (the merge takes main's version)."""

from __future__ import annotations

import pytest
import trustme


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()
