"""Start-up, client aborts and drain: nothing lost, nothing leaked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from tests.conftest import Sidecar
from tests.servers.upstream import Upstream, random_bytes, wait_until


def test_aborted_downloads_free_every_pool_slot(make_sidecar: Callable[..., Sidecar], upstream: Upstream) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}],
        pool={"max_connections": 4, "max_keepalive_connections": 4},
        timeouts={"pool": "500ms"},
    )
    # 50 downloads that would take 10 s each, dropped after the first chunk: unless the sidecar
    # closes the upstream side at once, the 4 slots stay busy and the 5th download times out.
    for _ in range(50):
        with httpx.stream("GET", f"{sidecar.url}/up/slow?n=100&interval=0.1") as response:
            assert response.status_code == 200
            for _chunk in response.iter_raw():
                break
    # Had any slot leaked, 4 concurrent requests through a 4-slot pool would hit the 0.5 s pool timeout.
    with httpx.Client(limits=httpx.Limits(max_connections=4)) as client:
        results: list[int] = []

        def worker() -> None:
            for _ in range(25):
                results.append(client.get(f"{sidecar.url}/up/bytes?n=100").status_code)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == [200] * 100


def test_drain_finishes_streams_serves_new_requests_then_exits_zero(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream
) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}],
        drain={"grace": "20s"},
    )
    expected = b"".join(random_bytes(1024, i) for i in range(20))
    outcome: dict[str, object] = {}
    first_byte = threading.Event()

    def download() -> None:  # a 10-second streaming download: 20 chunks, one every 0.5 s
        with httpx.stream("GET", f"{sidecar.url}/up/slow?n=20&interval=0.5", timeout=30) as response:
            chunks = []
            for chunk in response.iter_raw():
                chunks.append(chunk)
                first_byte.set()
            outcome["body"] = b"".join(chunks)

    thread = threading.Thread(target=download)
    thread.start()
    assert first_byte.wait(10)
    signalled = time.monotonic()
    sidecar.proc.send_signal(15)
    wait_until(lambda: httpx.get(f"{sidecar.admin_url}/readyz").status_code == 503, timeout=2,
               message="readyz turns 503 at once")
    assert httpx.get(f"{sidecar.admin_url}/healthz").status_code == 200
    # A new request during the grace period is still served.
    assert httpx.get(f"{sidecar.url}/up/echo").status_code == 200
    thread.join(30)
    assert outcome["body"] == expected
    assert sidecar.proc.wait(15) == 0
    assert time.monotonic() - signalled < 15  # exited once idle, not at the end of the 20 s grace
    events = [e.get("event") for e in sidecar.logs()]
    assert "draining" in events and "stopped" in events
    assert sidecar.wait_log(lambda e: e.get("event") == "stopped")["drain"] == "complete"


def test_drain_grace_expiry_cuts_streams_and_exits_zero(
    make_sidecar: Callable[..., Sidecar], upstream: Upstream
) -> None:
    sidecar = make_sidecar(
        routes=[{"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"}],
        drain={"grace": "1s"},
    )
    outcome: dict[str, object] = {}
    first_byte = threading.Event()

    def download() -> None:
        try:
            with httpx.stream("GET", f"{sidecar.url}/up/slow?n=100&interval=0.1", timeout=30) as response:
                for _ in response.iter_raw():
                    first_byte.set()
            outcome["result"] = "complete"
        except httpx.RemoteProtocolError as exc:  # the body ended short of its Content-Length
            outcome["result"] = f"truncated: {exc}"

    thread = threading.Thread(target=download)
    thread.start()
    assert first_byte.wait(10)
    signalled = time.monotonic()
    sidecar.proc.send_signal(15)
    assert sidecar.proc.wait(10) == 0
    assert time.monotonic() - signalled < 4
    thread.join(10)
    assert str(outcome["result"]).startswith("truncated")
