"""Moved to tests/transport/helpers.py (issue 14: in-process transport tests in tests/transport/).

Kept only so that branches written before the move still import; use tests.transport.helpers.
"""

from tests.transport.helpers import *  # noqa: F403
