"""Egress policy seam. Placeholder until the policy issue lands: allows every destination.

Interface the forward path relies on:
- `EgressPolicy.from_config(config)`
- `check_target(target)`: raise EgressError("denied_host"|"denied_ip") before any byte goes up.
- `resolve(host, port)`: the connect guard (resolve, check every address, return them).
"""

from __future__ import annotations

from sidecar.config import Config
from sidecar.routing import Target


class EgressPolicy:
    def __init__(self, config: Config) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: Config) -> EgressPolicy:
        return cls(config)

    def check_target(self, target: Target) -> None:
        return None
