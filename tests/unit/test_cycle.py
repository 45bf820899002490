"""ProxyCycle's response writes, on a real event loop with a recording transport.

What a write looks like on the wire is what these check (one write for the head and a
body that is ready, framing, refusals); that the head of a response whose body has not
started still reaches the app at once is shown end to end in tests/e2e/test_transparency.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from uvicorn.protocols.http.flow_control import FlowControl

from sidecar.ingress.writer import BODY_READY, ProxyCycle


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def run_cycle(scenario: Callable[[ProxyCycle], Awaitable[None]], method: str = "GET",
              keep_alive: bool = True) -> tuple[RecordingTransport, ProxyCycle]:
    transport = RecordingTransport()
    completed: list[bool] = []

    async def main() -> ProxyCycle:
        cycle = ProxyCycle(
            scope={"method": method, "http_version": "1.1"}, transport=transport,  # type: ignore[arg-type]
            flow=FlowControl(transport), logger=None, access_logger=None, access_log=False,  # type: ignore[arg-type]
            default_headers=[], message_event=asyncio.Event(), expect_100_continue=False,
            keep_alive=keep_alive, on_response=lambda: completed.append(True),
        )
        await scenario(cycle)
        return cycle

    cycle = uvloop.run(main())
    assert completed == ([True] if cycle.response_complete else [])
    return transport, cycle


def start(status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status,
            "headers": headers if headers is not None else [(b"content-length", b"5")]}


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def test_head_and_a_body_announced_ready_leave_in_one_write() -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send({**start(headers=[(b"Content-Length", b"5"), (b"X-A", b"1")]), BODY_READY: True})
        await cycle.send(body(b"hello"))

    transport, cycle = run_cycle(scenario)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"]
    assert cycle.response_complete


def test_without_the_announcement_the_head_goes_out_at_once() -> None:
    seen_before_body: list[list[bytes]] = []

    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send(start())
        seen_before_body.append(list(transport_of(cycle).writes))  # the app now waits for its upstream
        await cycle.send(body(b"hello"))

    transport, _ = run_cycle(scenario)
    assert seen_before_body == [[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]]
    assert transport.writes[1:] == [b"hello"]


def transport_of(cycle: ProxyCycle) -> RecordingTransport:
    return cycle.transport  # type: ignore[return-value]


def test_without_a_length_the_body_is_chunked_and_ends_with_the_last_chunk() -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send(start(headers=[]))
        await cycle.send(body(b"abc", more=True))
        await cycle.send(body(b"", more=True))
        await cycle.send(body(b"de"))

    transport, _ = run_cycle(scenario)
    assert b"".join(transport.writes) == (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_no_body_framing_for_head_204_and_304(method: str, status: int) -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send(start(status, headers=[(b"etag", b'"v1"')] if method == "GET" else [(b"content-length", b"9")]))
        await cycle.send(body(b""))

    transport, cycle = run_cycle(scenario, method=method)
    wire = b"".join(transport.writes)
    assert wire.endswith(b"\r\n\r\n") and b"transfer-encoding" not in wire and cycle.response_complete


def test_connection_close_is_kept_and_closes_after_the_response() -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send(start(headers=[(b"content-length", b"2"), (b"connection", b"Keep-Alive, Close")]))
        await cycle.send(body(b"ok"))

    transport, cycle = run_cycle(scenario)
    assert transport.closed and not cycle.keep_alive
    assert b"".join(transport.writes).count(b"connection") == 1


def test_a_client_without_keep_alive_gets_connection_close() -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        await cycle.send(start())
        await cycle.send(body(b"hello"))

    transport, _ = run_cycle(scenario, keep_alive=False)
    assert b"\r\nconnection: close\r\n" in transport.writes[0] and transport.closed


@pytest.mark.parametrize(
    "header",
    [(b"x-bad name", b"1"), (b"x-bad:", b"1"), (b"x-a", b"1\r\nx-injected: 1"), (b"x-a", b"\x00"), (b"x-a", b"a\nb")],
)
def test_invalid_header_bytes_are_refused_before_anything_is_written(header: tuple[bytes, bytes]) -> None:
    async def scenario(cycle: ProxyCycle) -> None:
        with pytest.raises(RuntimeError, match="Invalid HTTP header"):
            await cycle.send(start(headers=[(b"content-length", b"0"), header]))

    transport, _ = run_cycle(scenario)
    assert transport.writes == []


def test_a_body_longer_or_shorter_than_its_length_is_an_error() -> None:
    async def longer(cycle: ProxyCycle) -> None:
        await cycle.send(start())
        with pytest.raises(RuntimeError, match="longer"):
            await cycle.send(body(b"too long"))

    async def shorter(cycle: ProxyCycle) -> None:
        await cycle.send(start())
        with pytest.raises(RuntimeError, match="shorter"):
            await cycle.send(body(b"hi"))

    run_cycle(longer)
    run_cycle(shorter)
