"""Host names compare in one canonical form; patterns are exact or `*.suffix`."""

from __future__ import annotations

import pytest

from sidecar.policy.hostnames import HostPatterns, canonical_host, check_patterns


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("API.GitHub.com", "api.github.com"),
        ("api.github.com.", "api.github.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.de", "xn--bcher-kva.de"),
        ("bücher\uff0ede", "xn--bcher-kva.de"),  # full-width dot, mapped by UTS #46
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("2130706433", "127.0.0.1"),
        ("[::FFFF:7F00:1]", "::ffff:7f00:1"),
    ],
)
def test_canonical_forms(host: str, canonical: str) -> None:
    assert canonical_host(host) == canonical


@pytest.mark.parametrize(
    "host", ["a b.com", "evil.com\r\nx", "a..b", ".a", "a%2eb.com", "-a.com", "a" * 64 + ".com", "", "x/y", "a@b"]
)
def test_invalid_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(host)


def test_exact_and_wildcard_patterns() -> None:
    patterns = HostPatterns(["api.github.com", "*.stripe.com"])
    assert patterns.matches("api.github.com")
    assert patterns.matches("api.stripe.com")
    assert patterns.matches("a.b.stripe.com")
    assert not patterns.matches("stripe.com")  # the apex is not a subdomain
    assert not patterns.matches("evilstripe.com")
    assert not patterns.matches("stripe.com.evil.net")
    assert not patterns.matches("github.com")


def test_patterns_written_in_any_form_match_the_canonical_host() -> None:
    patterns = HostPatterns(["*.Bücher.DE.", "API.EXAMPLE.org."])
    assert patterns.matches(canonical_host("shop.xn--bcher-kva.de"))
    assert patterns.matches(canonical_host("Api.Example.Org."))


def test_star_matches_everything_and_empty_matches_nothing() -> None:
    assert HostPatterns(["*"]).matches("anything.example")
    assert not HostPatterns([]).matches("anything.example")
    assert not HostPatterns([])


def test_ip_literal_patterns_match_every_spelling() -> None:
    assert HostPatterns(["203.0.113.7"]).matches(canonical_host("3405803783"))


@pytest.mark.parametrize("pattern", ["*.10.0.0.1", "a b", "*.", "x.*.com"])
def test_invalid_patterns_are_reported(pattern: str) -> None:
    assert check_patterns([pattern]) is not None


def test_valid_patterns_pass_the_config_check() -> None:
    assert check_patterns(["api.github.com", "*.stripe.com", "*", "10.0.0.1"]) is None


def test_a_name_of_253_characters_is_the_longest() -> None:
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert canonical_host(longest) == longest
    with pytest.raises(ValueError, match="^not a valid host name$"):
        canonical_host(longest + "b")


@pytest.mark.parametrize(("host", "message"), [
    ("a..b", "not a valid host name"),
    ("xn--a.b\u0301", "invalid international host name: "),
])
def test_refused_hosts_say_why(host: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        canonical_host(host)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("pattern", ["*.1", "*.10.0.0.1", "*.[::1]"])
def test_a_wildcard_over_an_address_says_use_cidrs(pattern: str) -> None:
    assert check_patterns([pattern]) == (
        f"{pattern!r}: a wildcard applies to names, not addresses (use allow_cidrs)")


def test_patterns_of_each_kind_are_truthy() -> None:
    assert HostPatterns(["*.example.com"]) and HostPatterns(["a.example.com"]) and HostPatterns(["*"])
    assert not HostPatterns([])


def test_an_allow_all_is_dead_only_under_a_deny_all() -> None:
    from sidecar.policy.hostnames import never_applies

    assert never_applies(["*"], [" * "]) == "*"
    assert never_applies([" *"], ["*.example.com", "a.test"]) is None
