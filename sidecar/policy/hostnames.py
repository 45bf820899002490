"""Host names as policy compares them, and host patterns (`api.github.com`, `*.stripe.com`).

Pure functions. A name is compared in one canonical form: lower case, no trailing dot,
IDNA (UTS #46) ASCII, so `API.GitHub.com.`, `bücher.de` and `xn--bcher-kva.de` each match
the pattern written in any of those forms. IP literals are canonicalised through
`sidecar.policy.addresses` so `2130706433` and `127.0.0.1` are one host.
"""

from __future__ import annotations

import re

import idna

from sidecar.policy.addresses import parse_ip_literal

# After IDNA: letters, digits, hyphen; underscore is not valid in a host name but is common
# in service records and some internal names, and carries no parsing risk.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def endpoint(host: str, port: int) -> str:
    """`host:port` as labels and log lines show it, an IPv6 address in brackets (RFC 3986 3.2.2):
    `[::1]:8443`, not the ambiguous `::1:8443`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_host(host: str) -> str:
    """The canonical form of a host: a checked ASCII name, or an IP literal's compressed form.

    Raises ValueError for anything that is not a valid name or address (spaces, control
    characters, empty labels, `%`-escapes, over-long names): such a host is refused, never
    passed to a resolver that might read it differently.
    """
    address = parse_ip_literal(host)
    if address is not None:
        return str(address)
    name = host.strip()
    if not name.isascii():
        try:
            # UTS #46 maps case, full-width dots (U+FF0E) and other look-alikes, as browsers do.
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"invalid international host name: {exc}") from None
    name = name.lower()
    name = name.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError("not a valid host name")
    return name


class HostPatterns:
    """A set of host patterns: exact names, `*.suffix` (any depth of subdomain), `*` (all).

    `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com` itself:
    list both when both are meant. Matching costs one set lookup per label of the host.
    """

    __slots__ = ("_all", "_exact", "_suffixes")

    def __init__(self, patterns: list[str]) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        match_all = False
        for pattern in patterns:
            text = pattern.strip()
            if text == "*":
                match_all = True
            elif text.startswith("*."):
                if parse_ip_literal(text[2:]) is not None:
                    raise ValueError("a wildcard applies to names, not addresses (use allow_cidrs)")
                suffixes.add("." + canonical_host(text[2:]))
            else:
                exact.add(canonical_host(text))
        self._exact = frozenset(exact)
        self._suffixes = frozenset(suffixes)
        self._all = match_all

    def __bool__(self) -> bool:
        return self._all or bool(self._exact) or bool(self._suffixes)

    def matches(self, canonical: str) -> bool:
        """Whether a host already in `canonical_host` form matches one of the patterns."""
        if self._all or canonical in self._exact:
            return True
        if self._suffixes:
            index = canonical.find(".")
            while index != -1:
                if canonical[index:] in self._suffixes:
                    return True
                index = canonical.find(".", index + 1)
        return False


def check_patterns(patterns: list[str]) -> str | None:
    """The first invalid pattern in `patterns` with the reason, or None (for config validation)."""
    for pattern in patterns:
        try:
            HostPatterns([pattern])
        except ValueError as exc:
            return f"{pattern!r}: {exc}"
    return None


def never_applies(allow: list[str], deny: list[str]) -> str | None:
    """The first pattern of `allow` that `deny` covers entirely (deny wins, so it could never allow), or None.

    `api.example.com` under `*.example.com`, `*.a.example.com` under `*.example.com`, a
    pattern listed in both, anything under `*`. Patterns must already pass `check_patterns`.
    """
    denied = HostPatterns(deny)
    # Only wildcards cover a wildcard: `_` stands for any label under the allowed suffix.
    denied_wildcards = HostPatterns([p for p in deny if p.strip().startswith("*")])
    for pattern in allow:
        text = pattern.strip()
        if text == "*":
            covered = "*" in (p.strip() for p in deny)
        elif text.startswith("*."):
            covered = denied_wildcards.matches("_." + canonical_host(text[2:]))
        else:
            covered = denied.matches(canonical_host(text))
        if covered:
            return pattern
    return None
