"""Routing: scope -> Target, both addressing forms, loops, bad targets. Pure."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import config as cfg
from sidecar.errors import EgressError
from sidecar.proxy.routing import Router, compile_route, normalise_host, split_authority

CONFIG = cfg.from_mapping(
    {
        "routes": [
            {"name": "github", "prefix": "/github", "upstream": "https://api.github.com"},
            {"name": "v2", "prefix": "/github/v2", "upstream": "https://v2.example.com:8443/base/"},
            {"name": "self", "prefix": "/self", "upstream": "http://127.0.0.1:15001"},
        ],
        "policy": {"plain_http_hosts": ["plain.example.com"]},
    }
)


def router() -> Router:
    """Built in each test that uses it (not at import), so mutation testing sees who covers it."""
    return Router(CONFIG, [compile_route(r, CONFIG) for r in CONFIG.routes])


def scope(raw_path: bytes, host: bytes | None = b"127.0.0.1:15001", query: bytes = b"") -> dict[str, Any]:
    headers = [(b"host", host)] if host is not None else []
    return {"raw_path": raw_path, "path": raw_path.decode(), "query_string": query, "headers": headers}


def test_route_prefix_strips_and_keeps_query() -> None:
    target = router().resolve(scope(b"/github/repos/x", query=b"y=1&z=%20"))
    assert target.route is not None and target.route.name == "github"
    assert (target.scheme, target.host, target.port) == ("https", "api.github.com", 443)
    assert (target.path, target.query) == ("/repos/x", "y=1&z=%20")
    assert target.host_header == b"api.github.com"


def test_longest_prefix_wins_and_base_path_is_joined() -> None:
    target = router().resolve(scope(b"/github/v2/items"))
    assert target.route is not None and target.route.name == "v2"
    assert (target.path, target.port, target.host_header) == ("/base/items", 8443, b"v2.example.com:8443")


def test_prefix_matches_whole_segments_only() -> None:
    with pytest.raises(EgressError) as error:
        router().resolve(scope(b"/githubber/x"))
    assert error.value.kind == "no_route"


def test_bare_prefix_goes_to_root() -> None:
    assert router().resolve(scope(b"/github")).path == "/"


def test_forward_form_from_host_header_originates_tls() -> None:
    target = router().resolve(scope(b"/x", host=b"API.Example.COM."))
    assert (target.route, target.scheme, target.host, target.port, target.path) == (
        None, "https", "api.example.com", 443, "/x")
    assert target.url().port is None
    assert str(target.url()) == "https://api.example.com/x"


def test_forward_form_keeps_an_explicit_non_80_port() -> None:
    target = router().resolve(scope(b"/x", host=b"api.example.com:8443"))
    assert (target.scheme, target.port, target.host_header) == ("https", 8443, b"api.example.com:8443")


def test_absolute_uri_as_h11_delivers_it() -> None:
    target = router().resolve(scope(b"http://api.example.com/a/b", host=b"ignored.example"))
    assert (target.host, target.path) == ("api.example.com", "/a/b")


def test_plain_http_hosts_stay_plain() -> None:
    target = router().resolve(scope(b"/x", host=b"plain.example.com"))
    assert (target.scheme, target.port) == ("http", 80)


@pytest.mark.parametrize(
    "request_scope",
    [
        scope(b"/x", host=b"127.0.0.1:15090"),  # the admin listener
        scope(b"/x", host=b"localhost:15090"),
        scope(b"http://127.0.0.1:15001/x"),
        scope(b"http://localhost:15001/x"),
        scope(b"/self/x"),  # a route whose upstream is the sidecar itself
    ],
)
def test_requests_to_the_sidecar_itself_are_loops(request_scope: dict[str, Any]) -> None:
    with pytest.raises(EgressError) as error:
        router().resolve(request_scope)
    assert error.value.kind == "loop"


@pytest.mark.parametrize(
    "request_scope",
    [
        scope(b"/x", host=b"bad host"),
        scope(b"/x", host=b"a@b.example"),
        scope(b"/x", host=b"example.com:99999"),
        scope(b"/x", host=b"[::1"),
        scope(b"*", host=b"example.com"),
        scope(b"/\xc3\xa9", host=b"example.com"),
    ],
)
def test_unparseable_targets_are_bad_requests(request_scope: dict[str, Any]) -> None:
    with pytest.raises(EgressError) as error:
        router().resolve(request_scope)
    assert error.value.kind == "bad_request"


def test_no_host_and_no_route_is_no_route() -> None:
    with pytest.raises(EgressError) as error:
        router().resolve(scope(b"/nothing", host=None))
    assert error.value.kind == "no_route"


def test_host_normalisation() -> None:
    assert normalise_host("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalise_host("[::1]") == "::1"
    assert split_authority("[::1]:8080") == ("::1", 8080)
    assert split_authority("a.example") == ("a.example", None)


def test_forward_proxy_requests_keep_their_query_string() -> None:
    target = router().resolve(scope(b"/x/y", host=b"api.example.com", query=b"a=1&b=%20c"))
    assert (target.path, target.query) == ("/x/y", "a=1&b=%20c")
    assert str(target.url()) == "https://api.example.com/x/y?a=1&b=%20c"
    absolute = router().resolve(scope(b"http://api.example.com/x", host=None, query=b"q"))
    assert (absolute.path, absolute.query) == ("/x", "q")


@pytest.mark.parametrize(("request_scope", "url"), [
    (scope(b"/github/repos/x", query=b"y=1"), "https://api.github.com/repos/x?y=1"),
    (scope(b"/github/v2/items"), "https://v2.example.com:8443/base/items"),
    (scope(b"/x", host=b"api.example.com:8443"), "https://api.example.com:8443/x"),
    (scope(b"/x", host=b"plain.example.com"), "http://plain.example.com/x"),
    (scope(b"/x", host=b"plain.example.com:8080"), "http://plain.example.com:8080/x"),
    (scope(b"/a%2Fb", host=b"[2001:db8::1]"), "https://[2001:db8::1]/a%2Fb"),
])
def test_the_url_handed_to_httpx(request_scope: dict[str, Any], url: str) -> None:
    target = router().resolve(request_scope)
    handed = target.url()
    assert str(handed) == url
    assert handed.raw_path == (target.path + (f"?{target.query}" if target.query is not None else "")).encode()


def test_without_plain_http_hosts_every_destination_goes_out_over_tls() -> None:
    config = cfg.from_mapping({})
    router = Router(config, [])
    for request_scope in (scope(b"/x", host=b"plain.example.com"), scope(b"http://plain.example.com/x", host=None),
                          scope(b"/x", host=b"10.0.0.1:80")):
        target = router.resolve(request_scope)
        assert (target.scheme, target.port) == ("https", 443)


def test_plain_http_hosts_match_exactly_or_by_suffix_only() -> None:
    config = cfg.from_mapping({"policy": {"plain_http_hosts": ["plain.example.com", "*.internal.test"]}})
    router = Router(config, [])
    assert router.resolve(scope(b"/x", host=b"a.internal.test")).scheme == "http"
    assert router.resolve(scope(b"/x", host=b"PLAIN.example.com.")).scheme == "http"
    assert router.resolve(scope(b"/x", host=b"other.example.com")).scheme == "https"
    assert router.resolve(scope(b"/x", host=b"internal.test.evil")).scheme == "https"


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]", "localhost.", "0.0.0.0", "[::]"]


@pytest.mark.parametrize("name", LOOPBACK_NAMES)
def test_each_loopback_name_on_the_listen_port_is_the_sidecar_itself(name: str) -> None:
    host = (f"[{name.strip('[]')}]" if ":" in name else name).encode()
    target = router().resolve(scope(b"/github/x", host=host + b":15001"))
    assert target.route is not None and target.route.name == "github"
    with pytest.raises(EgressError) as error:
        router().resolve(scope(b"/x", host=host + b":15090"))  # the admin listener
    assert error.value.kind == "loop"


def test_a_routes_own_timeouts_override_the_global_ones() -> None:
    config = cfg.from_mapping({
        "timeouts": {"connect": "2s", "read": "7s", "write": "8s", "pool": "1s"},
        "routes": [{"name": "r", "prefix": "/r", "upstream": "https://r.test", "timeouts": {"read": "30s"}}],
    })
    route = compile_route(config.routes[0], config)
    assert route.timeouts == {"connect": 2.0, "read": 30.0, "write": 8.0, "pool": 1.0}
    assert Router(config, [route]).default_timeouts == {"connect": 2.0, "read": 7.0, "write": 8.0, "pool": 1.0}


@pytest.mark.parametrize(("authority", "expected"), [
    ("api.example.com", ("api.example.com", None)),
    ("api.example.com:1", ("api.example.com", 1)),
    ("api.example.com:65535", ("api.example.com", 65535)),
    ("api.example.com:", ("api.example.com", None)),
    ("[::1]", ("::1", None)),
    ("[::1]:8443", ("::1", 8443)),
])
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


@pytest.mark.parametrize(("authority", "message"), [
    ("[::1", "unclosed IPv6 literal"),
    ("[::1]x", "junk after IPv6 literal"),
    ("[::1]:80]", "bad port '80]'"),
    ("user@api.example.com", "userinfo is not allowed in the authority"),
    ("api.example.com:0", "bad port '0'"),
    ("api.example.com:65536", "bad port '65536'"),
    ("api.example.com:8o", "bad port '8o'"),
])
def test_split_authority_refusals_say_why(authority: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        split_authority(authority)
    assert str(error.value) == message


@pytest.mark.parametrize(("host", "expected"), [
    ("Bücher.Example.", "xn--bcher-kva.example"),
    ("::1", "::1"),
    ("[2001:DB8::1]", "2001:db8::1"),
    (" api.example.com ", "api.example.com"),
])
def test_normalise_host(host: str, expected: str) -> None:
    assert normalise_host(host) == expected


@pytest.mark.parametrize(("host", "message"), [
    ("", "empty host"), (".", "empty host"), ("a b", "invalid host 'a b'"), ("[::1].", "invalid host '[::1].'"),
])
def test_normalise_host_refusals_say_why(host: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        normalise_host(host)
    assert str(error.value) == message


@pytest.mark.parametrize(("request_scope", "kind", "detail"), [
    (scope(b"/x", host=b"user@api.example.com"), "bad_request", "bad Host header: userinfo is not allowed"),
    (scope(b"http://a b/x", host=None), "bad_request", "bad destination: invalid host 'a b'"),
    (scope(b"/githubX/y"), "no_route", "no route prefix matches b'/githubX/y'"),
    (scope(b"/" + b"n" * 150), "no_route", f"no route prefix matches {(b'/' + b'n' * 99)!r}"),
    (scope(b"/self/x"), "loop", "route self points at the sidecar itself"),
    (scope(b"http://127.0.0.5:15090/x", host=None), "loop", "127.0.0.5:15090 is the sidecar's own listener"),
    (scope(b"/x", host=b"127.0.0.5:15090"), "loop", "127.0.0.5:15090 is the sidecar's own listener"),
    (scope(b"x", host=None), "bad_request", "request target must be an absolute path or absolute URI"),
    (scope("/é".encode(), host=None), "bad_request", "non-ASCII bytes in the request target"),
])
def test_refusals_name_their_kind_and_why(request_scope: dict[str, Any], kind: str, detail: str) -> None:
    with pytest.raises(EgressError) as error:
        router().resolve(request_scope)
    assert error.value.kind == kind
    assert error.value.detail.startswith(detail), error.value.detail


def test_loopback_addresses_off_the_sidecars_ports_are_forwarded() -> None:
    target = router().resolve(scope(b"/x", host=b"127.0.0.2:9000"))
    assert (target.route, target.host, target.port) == (None, "127.0.0.2", 9000)


def test_the_sidecars_own_listen_and_admin_names_are_itself() -> None:
    config = cfg.from_mapping({
        "listen": {"host": "Sidecar.Local", "port": 15001, "allow_non_loopback": True}, "admin": {"host": "[::1]", "port": 15090},
        "routes": [{"name": "r", "prefix": "/r", "upstream": "https://r.test"}],
    })
    own = Router(config, [compile_route(r, config) for r in config.routes])
    assert own.resolve(scope(b"/r/x", host=b"sidecar.local:15001")).route is not None
    for host in (b"sidecar.local:15090", b"[::1]:15090"):
        with pytest.raises(EgressError) as error:
            own.resolve(scope(b"/x", host=host))
        assert error.value.kind == "loop"


def test_routes_given_shortest_first_still_match_longest_first() -> None:
    config = cfg.from_mapping({"routes": [
        {"name": "short", "prefix": "/a", "upstream": "https://short.test"},
        {"name": "long", "prefix": "/a/b", "upstream": "https://long.test"},
    ]})
    routes = [compile_route(r, config) for r in config.routes]
    assert [r.name for r in Router(config, routes).routes] == ["long", "short"]
    assert [r.name for r in Router(config, routes[::-1]).routes] == ["long", "short"]


def test_an_invalid_name_is_never_plain_http() -> None:
    config = cfg.from_mapping({"policy": {"plain_http_hosts": ["*.example.com"]}})
    target = Router(config, []).resolve(scope(b"/x", host=b"a..b.example.com"))
    assert target.scheme == "https"  # the policy refuses the name; it is never sent in the clear


def test_an_ipv6_destination_gets_a_bracketed_host_header() -> None:
    target = router().resolve(scope(b"http://[2001:db8::1]:8443/x", host=None))
    assert (target.host, target.port, target.host_header) == ("2001:db8::1", 8443, b"[2001:db8::1]:8443")
    default_port = router().resolve(scope(b"/x", host=b"[2001:db8::1]"))
    assert default_port.host_header == b"[2001:db8::1]"


@pytest.mark.parametrize(("upstream", "fields"), [
    ("https://api.example.com", ("https", "api.example.com", 443, "", b"api.example.com")),
    ("https://api.example.com:443/", ("https", "api.example.com", 443, "", b"api.example.com")),
    ("http://api.example.com:8080/v1/", ("http", "api.example.com", 8080, "/v1", b"api.example.com:8080")),
    ("https://[2001:db8::1]/a/b//", ("https", "2001:db8::1", 443, "/a/b", b"[2001:db8::1]")),
    ("https://[2001:db8::1]:8443", ("https", "2001:db8::1", 8443, "", b"[2001:db8::1]:8443")),
    ("https://api.example.com/p://q", ("https", "api.example.com", 443, "/p://q", b"api.example.com")),
    ("https://api.example.com/V1X/", ("https", "api.example.com", 443, "/V1X", b"api.example.com")),
])
def test_compile_route(upstream: str, fields: tuple[str, str, int, str, bytes]) -> None:
    config = cfg.from_mapping({"routes": [{"name": "r", "prefix": "/r/", "upstream": upstream}]})
    injected = ((b"authorization", lambda: b"x"),)
    route = compile_route(config.routes[0], config, injected)
    assert (route.scheme, route.host, route.port, route.base_path, route.host_header) == fields
    assert (route.name, route.prefix, route.config, route.injected_headers) == ("r", b"/r", config.routes[0], injected)


def test_a_scope_without_raw_path_or_query_string() -> None:
    target = router().resolve({"path": "/github/x", "headers": [(b"host", b"127.0.0.1:15001")]})
    assert (target.path, target.query) == ("/x", None)
    with pytest.raises(EgressError) as error:
        router().resolve({"path": "/gïthub", "headers": []})
    assert error.value.detail == "no route prefix matches b'/g?thub'"


def test_a_host_without_port_is_port_80() -> None:
    config = cfg.from_mapping({"listen": {"port": 80},
                               "routes": [{"name": "r", "prefix": "/r", "upstream": "https://r.test"}]})
    own = Router(config, [compile_route(r, config) for r in config.routes])
    assert own.resolve(scope(b"/r/x", host=b"127.0.0.1")).route is not None
    assert own.resolve(scope(b"/r/x", host=b"localhost")).route is not None


def test_any_127_address_on_the_listen_port_is_the_sidecar() -> None:
    target = router().resolve(scope(b"/github/x", host=b"127.0.0.5:15001"))
    assert target.route is not None and target.route.name == "github"


def test_the_admin_listeners_name_is_the_sidecar_too() -> None:
    config = cfg.from_mapping({"admin": {"host": "[FD00::1]", "port": 15090}})
    own = Router(config, [])
    for host in (b"[fd00::1]:15090", b"[FD00::1]:15090"):
        with pytest.raises(EgressError) as error:
            own.resolve(scope(b"/x", host=host))
        assert error.value.kind == "loop"


def test_a_prefix_keeps_all_but_its_trailing_slash() -> None:
    config = cfg.from_mapping({"routes": [{"name": "r", "prefix": "/apiX/", "upstream": "https://r.test"}]})
    assert compile_route(config.routes[0], config).prefix == b"/apiX"


@pytest.mark.parametrize("raw_path", [b"https://api.example.com/x://y", b"HTTPS://api.example.com/x://y"])
def test_an_absolute_https_uri_splits_at_its_first_scheme_separator(raw_path: bytes) -> None:
    target = router().resolve(scope(raw_path, host=None, query=b"q"))
    assert (target.host, target.path, target.query) == ("api.example.com", "/x://y", "q")


def test_a_route_without_a_host_header_keeps_the_query() -> None:
    target = router().resolve(scope(b"/github/x", host=None, query=b"a=1"))
    assert target.route is not None and target.query == "a=1"


def test_the_transparent_listener_is_the_sidecar_too() -> None:
    config = cfg.from_mapping({"listen": {"transparent_port": 15006}})
    own = Router(config, [])
    assert own.own_ports == {15001, 15090, 15006}
    with pytest.raises(EgressError) as error:
        own.resolve(scope(b"/x", host=b"127.0.0.1:15006"))
    assert error.value.kind == "loop"
    assert Router(cfg.from_mapping({"listen": {"transparent_port": None}}), []).own_ports == {15001, 15090}
