"""Moved to tests/servers/nginx.py (issue 14: test servers in one place).

Kept only so that branches written before the move still import; use tests.servers.nginx.
"""

from tests.servers.nginx import *  # noqa: F403
