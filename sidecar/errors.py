"""Placeholder until main's errors module lands (the merge takes main's version)."""


class EgressError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
