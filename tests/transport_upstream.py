"""Moved to tests/servers/loop_upstream.py (issue 14: test servers in one place).

Kept only so that branches written before the move still import; use tests.servers.loop_upstream.
"""

from tests.servers.loop_upstream import *  # noqa: F403
