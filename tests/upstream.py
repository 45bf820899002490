"""Moved to tests/servers/upstream.py (issue 14: test servers in one place).

Kept only so that branches written before the move still import; use tests.servers.upstream.
"""

from tests.servers.upstream import *  # noqa: F403
