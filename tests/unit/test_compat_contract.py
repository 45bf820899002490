"""The contract with other libraries' internals (sidecar/_compat/): an upgrade that moves one fails here.

Each failure says what to re-read. The checks: the installed versions are inside the bounds
pyproject.toml gives; every private attribute sidecar/_compat/ touches is there; the uvicorn
code we rewrote (or whose inside we rely on) still has the source we read (a recorded hash);
and the fast httpx builders make objects equal, attribute for attribute, to the constructors'.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib
import inspect
import socket
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from packaging.requirements import Requirement
from uvicorn.protocols.http import httptools_impl

from sidecar._compat import h2 as compat_h2
from sidecar._compat import httpcore as compat_httpcore
from sidecar._compat import httpx as compat_httpx
from sidecar._compat import uvicorn as compat_uvicorn

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
# The libraries whose internals sidecar/_compat/ uses: each must have an upper bound.
BOUNDED = ("uvicorn", "httptools", "httpx", "httpcore", "h2", "h11")


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {req.name: req for req in map(Requirement, project["dependencies"])}


@pytest.mark.parametrize("name", BOUNDED)
def test_installed_version_is_inside_the_bounds_of_pyproject(name: str) -> None:
    requirement = _requirements().get(name)
    assert requirement is not None, f"pyproject.toml does not bound {name}: add `{name}>=X.Y,<X.Y+1`"
    assert any(spec.operator == "<" for spec in requirement.specifier), (
        f"{name} has no upper bound in pyproject.toml: bound it to the minor tested")
    installed = metadata.version(name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is outside pyproject's {requirement.specifier}: re-read the docstring of "
        f"sidecar/_compat/{name if name != 'httptools' else 'uvicorn'}.py, run this test file, then move the bound")


# ---- uvicorn: the code we rewrote still reads as it did ----------------------------------

def _source_of(qualname: str) -> str:
    """Source of a module attribute path; names past the last attribute are nested functions."""
    parts = qualname.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        rest = parts[split:]
        break
    nested: list[str] = []
    for name in rest:
        if not nested and hasattr(obj, name):
            obj = getattr(obj, name)
        else:
            nested.append(name)
    source = textwrap.dedent(inspect.getsource(obj))
    for name in nested:
        node = next(
            (n for n in ast.walk(ast.parse(source))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name),
            None,
        )
        assert node is not None, f"{qualname}: no nested function {name!r} any more"
        segment = ast.get_source_segment(source, node, padded=True)
        assert segment is not None
        source = textwrap.dedent(segment)
    return source


@pytest.mark.parametrize("qualname", sorted(compat_uvicorn.REWRITTEN))
def test_rewritten_uvicorn_code_is_unchanged(qualname: str) -> None:
    recorded, ours = compat_uvicorn.REWRITTEN[qualname]
    digest = hashlib.sha256(_source_of(qualname).encode()).hexdigest()
    assert digest == recorded, (
        f"uvicorn {metadata.version('uvicorn')} changed {qualname}. Re-read it against {ours}, "
        f"carry its change over, then record its new hash in sidecar/_compat/uvicorn.py REWRITTEN: {digest}")


def test_source_hash_reads_a_nested_function_alone() -> None:
    source = _source_of("uvicorn.server.Server.startup.create_protocol")
    assert source.startswith("def create_protocol(") and "http_protocol_class" in source
    assert "create_server" not in source  # the rest of startup is not part of the hash


@pytest.mark.parametrize(("cls", "names"), [
    (httptools_impl.HttpToolsProtocol, [
        "data_received", "on_url", "on_headers_complete", "on_message_begin", "connection_made",
        "connection_lost", "_unset_keepalive_if_required", "_should_upgrade", "handle_websocket_upgrade",
        "_unsupported_upgrade_warning"]),
    (httptools_impl.RequestResponseCycle, ["send", "receive", "run_asgi"]),
    (uvicorn.Server, ["serve", "startup", "capture_signals", "shutdown"]),
])
def test_uvicorn_methods_we_call_or_override_exist(cls: type, names: list[str]) -> None:
    missing = [name for name in names if not callable(getattr(cls, name, None))]
    assert not missing, f"uvicorn's {cls.__name__} lost {missing}: re-read sidecar/_compat/uvicorn.py's docstring"


def test_our_names_for_uvicorns_private_methods_are_the_same_functions() -> None:
    ours, theirs = compat_uvicorn.HttpToolsProtocol, httptools_impl.HttpToolsProtocol
    assert ours.stop_keepalive_timer is theirs._unset_keepalive_if_required
    assert ours.upgrade_requested is theirs._should_upgrade
    assert ours.warn_unsupported_upgrade is theirs._unsupported_upgrade_warning
    assert compat_uvicorn.RequestResponseCycle is httptools_impl.RequestResponseCycle


PROTOCOL_ATTRIBUTES = ("url", "headers", "cycle", "parser", "transport", "loop")
CYCLE_ATTRIBUTES = (
    "flow", "disconnected", "response_started", "response_complete", "waiting_for_100_continue",
    "default_headers", "chunked_encoding", "expected_content_length", "keep_alive", "scope", "transport",
    "message_event", "on_response",
)


def test_uvicorn_protocol_and_cycle_have_the_attributes_we_touch() -> None:
    """A real uvicorn protocol on a real socket pair, built by our copy of its factory, serves
    one request; the app looks at the protocol and the cycle it was given."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        cycle = send.__self__
        protocol = seen["protocols"][0]
        seen["cycle"] = [name for name in CYCLE_ATTRIBUTES if not hasattr(cycle, name)]
        seen["protocol"] = [name for name in PROTOCOL_ATTRIBUTES if not hasattr(protocol, name)]
        seen["flow"] = [name for name in ("write_paused", "drain") if not hasattr(cycle.flow, name)]
        seen["cycle_is_protocols"] = protocol.cycle is cycle
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def main() -> bytes:
        config = uvicorn.Config(app, http="httptools", ws="none", lifespan="off", log_config=None,
                                access_log=False)
        server = compat_uvicorn.SignalFreeServer(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        factory = compat_uvicorn.protocol_factory(server)
        protocols: list[asyncio.Protocol] = []
        seen["protocols"] = protocols

        def make() -> asyncio.Protocol:
            protocols.append(factory())
            return protocols[-1]

        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(make, ours)
        try:
            await loop.sock_sendall(theirs, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
            theirs.setblocking(False)
            async with asyncio.timeout(5):
                return await loop.sock_recv(theirs, 1024)
        finally:
            transport.close()
            theirs.close()

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 204"), answer
    message = "re-read sidecar/_compat/uvicorn.py's docstring, cycle.py and limits.py: uvicorn lost"
    assert seen["protocol"] == [], f"{message} protocol attributes {seen['protocol']}"
    assert seen["cycle"] == [], f"{message} cycle attributes {seen['cycle']}"
    assert seen["flow"] == [], f"{message} flow-control attributes {seen['flow']}"
    assert seen["cycle_is_protocols"]


def test_signal_free_server_installs_no_signal_handler() -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with compat_uvicorn.SignalFreeServer(uvicorn.Config(app=None)).capture_signals():
        assert signal.getsignal(signal.SIGTERM) is before


# ---- httpx: the fast builders equal the constructors --------------------------------------

def test_fast_request_equals_the_constructors() -> None:
    headers = [(b"host", b"api.example.com"), (b"x-a", b"1"), (b"x-a", b"2"), (b"content-type", b"text/plain")]
    url = httpx.URL("https://api.example.com/x?y=1")
    stream = httpx.ByteStream(b"")
    fast = compat_httpx.build_request("POST", url, headers, stream, {"timeout": {}})
    slow = httpx.Request("POST", url, headers=headers, stream=stream, extensions={"timeout": {}})
    fast_state, slow_state = vars(fast), vars(slow)
    assert fast_state.keys() == slow_state.keys(), (
        "httpx.Request's attributes changed: re-read httpx/_models.py Request.__init__ against "
        "sidecar/_compat/httpx.py build_request")
    assert {k: v for k, v in fast_state.items() if k != "headers"} == {
        k: v for k, v in slow_state.items() if k != "headers"}
    assert vars(fast.headers) == vars(slow.headers)
    assert fast.headers.get_list("x-a") == ["1", "2"] and fast.headers["Content-Type"] == "text/plain"


def test_fast_response_equals_the_constructors() -> None:
    headers = [(b"Content-Type", b"text/plain"), (b"X-A", b"1"), (b"x-a", b"2"), (b"Content-Length", b"5")]
    stream = httpx.ByteStream(b"hello")
    extensions = {"http_version": b"HTTP/1.1", "reason_phrase": b"OK"}
    fast = compat_httpx.build_response(200, headers, stream, dict(extensions))
    slow = httpx.Response(200, headers=headers, stream=stream, extensions=dict(extensions))
    fast_state, slow_state = vars(fast), vars(slow)
    assert fast_state.keys() == slow_state.keys(), (
        "httpx.Response's attributes changed: re-read httpx/_models.py Response.__init__ against "
        "sidecar/_compat/httpx.py build_response")
    assert {k: v for k, v in fast_state.items() if k != "headers"} == {
        k: v for k, v in slow_state.items() if k != "headers"}
    assert vars(fast.headers) == vars(slow.headers)
    assert fast.headers.get_list("x-a") == ["1", "2"] and fast.headers["content-type"] == "text/plain"


@pytest.mark.parametrize(("parts", "text"), [
    (("https", "api.example.com", None, "/x", "y=1&z"), "https://api.example.com/x?y=1&z"),
    (("http", "10.0.0.1", 8080, "/", None), "http://10.0.0.1:8080/"),
    (("https", "::1", 8443, "/a%20b", ""), "https://[::1]:8443/a%20b?"),
])
def test_raw_url_equals_the_parsed_url(parts: tuple[Any, ...], text: str) -> None:
    fast, slow = compat_httpx.raw_url(*parts), httpx.URL(text)
    assert vars(fast) == vars(slow), "httpx.URL changed: re-read httpx/_urls.py against sidecar/_compat/httpx.py"
    assert (fast.raw_path, fast.host, fast.port) == (slow.raw_path, slow.host, slow.port)


def test_raw_url_keeps_bytes_the_parser_would_quote() -> None:
    url = compat_httpx.raw_url("https", "a.test", None, "/a b|{}", "q=a b")
    assert url.raw_path == b"/a b|{}?q=a b"


def test_in_memory_body_reads_the_bytes_of_a_byte_stream_only() -> None:
    assert compat_httpx.in_memory_body(httpx.ByteStream(b"abc")) == b"abc"
    assert compat_httpx.in_memory_body(httpx.Request("POST", "https://a/", content=b"xy").stream) == b"xy"
    assert compat_httpx.in_memory_body(object()) is None


# ---- httpcore: the pool behind httpx's stock transport -------------------------------------

def test_httpcore_pool_takes_a_network_backend_and_counts_connections() -> None:
    import httpcore

    transport = httpx.AsyncHTTPTransport()
    backend = httpcore.AnyIOBackend()
    compat_httpcore.set_network_backend(transport, backend)
    pool = transport._pool
    assert pool._network_backend is backend, "re-read httpcore/_async/connection_pool.py __init__"
    assert compat_httpcore.pool_counts(transport) == (0, 0)
    connection = httpcore.AsyncHTTPConnection(httpcore.Origin(b"https", b"a.test", 443))
    assert callable(connection.is_idle) and callable(connection.is_closed)


def test_set_network_backend_refuses_a_transport_without_httpcore_pool() -> None:
    with pytest.raises(RuntimeError, match="connect guard"):
        compat_httpcore.set_network_backend(object(), None)


# ---- h2: the errors httpcore hands us ------------------------------------------------------

def _closed_state_error() -> Exception:
    """h2's own error for a frame on a connection it saw closed (a GOAWAY came first)."""
    import h2.config
    import h2.connection
    import h2.exceptions

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.close_connection()
    with pytest.raises(h2.exceptions.ProtocolError) as raised:
        client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")])
    return raised.value


def test_h2_closed_state_error_still_reads_as_a_connection_end() -> None:
    import httpcore

    error = _closed_state_error()
    assert compat_h2.CLOSED_STATE_TEXT in str(error), (
        f"h2's closed-state text is now {str(error)!r}: re-read h2/connection.py and sidecar/_compat/h2.py")
    wrapped = httpx.LocalProtocolError(str(error))
    wrapped.__cause__ = httpcore.LocalProtocolError(error)
    assert compat_h2.is_connection_end(wrapped)


@pytest.mark.parametrize("name", sorted(compat_h2.RESET_EVENTS))
def test_h2_reset_events_keep_their_names(name: str) -> None:
    import h2.events

    event = getattr(h2.events, name, None)
    assert event is not None, f"h2.events.{name} is gone: re-read h2/events.py and sidecar/_compat/h2.py"
    assert event.__module__.startswith("h2.")
    wrapped = httpx.RemoteProtocolError("x")
    wrapped.__cause__ = Exception(event.__new__(event))  # the class is what is matched
    assert compat_h2.is_connection_end(wrapped)


def test_h2_other_errors_are_not_a_connection_end() -> None:
    import h2.events

    wrapped = httpx.RemoteProtocolError("x")
    wrapped.__cause__ = Exception(h2.events.DataReceived(stream_id=1))
    assert not compat_h2.is_connection_end(wrapped)
    assert not compat_h2.is_connection_end(httpx.RemoteProtocolError("ConnectionState.CLOSED"))


# ---- the lock: every install gets the versions tested ---------------------------------------

def test_constraints_pin_the_installed_version_of_every_bounded_library() -> None:
    lines = (PYPROJECT.parent / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for name in (*BOUNDED, "uvloop", "prometheus-client", "structlog", "msgspec", "pyyaml"):
        assert name in pins, f"constraints.txt pins no {name}: run `make constraints`"
        assert pins[name] == metadata.version(name), (
            f"{name} {metadata.version(name)} installed, constraints.txt pins {pins[name]}: "
            "reinstall with `make` or, after testing the upgrade, `make constraints`")
        requirement = _requirements().get(name)
        if requirement is not None:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {name} {pins[name]}, outside pyproject's {requirement.specifier}")
