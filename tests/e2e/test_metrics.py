"""/metrics on the admin port: valid under load, OpenMetrics on request, pool gauges read from the pool."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import httpx

from tests.conftest import Sidecar
from tests.prometheus import promtool_check, samples, scrape, total
from tests.servers.upstream import Upstream, wait_until


def closed_port() -> int:
    with socket.socket() as sock:  # bound and released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_scrape_taken_under_load_passes_promtool(make_sidecar: Callable[..., Sidecar], upstream: Upstream) -> None:
    sidecar = make_sidecar(routes=[
        {"name": "up", "prefix": "/up", "upstream": f"https://localhost:{upstream.port}"},
        {"name": "dead", "prefix": "/dead", "upstream": f"https://localhost:{closed_port()}"},
    ])
    stop = threading.Event()
    done = [0]

    def load() -> None:
        paths = ["/up/bytes?n=2000", "/up/echo", "/up/status/503", "/nothing", "/dead/x"]
        with httpx.Client(base_url=sidecar.url, timeout=10) as client:
            for index in range(400):  # bounded in count; `stop` bounds it in time
                if stop.is_set():
                    return
                client.post("/up/echo", content=b"x" * 100) if index % 7 == 0 else client.get(paths[index % 5])
                done[0] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: done[0] >= 40, timeout=30, message="load running")
        scrapes = [scrape(sidecar.admin_url) for _ in range(3)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    for text in scrapes:
        result = promtool_check(text)
        assert result.returncode == 0, result.stdout + result.stderr
    found = samples(scrapes[-1])
    assert total(found, "egress_requests_total") > 0
    assert total(found, "egress_errors_total", kind="no_route") > 0
    assert total(found, "egress_errors_total", kind="connect_error") > 0
    assert total(found, "egress_request_bytes_total", route="up") > 0
    # No label value carries a path or a query.
    assert "?" not in "".join(line for line in scrapes[-1].splitlines() if line.startswith("egress_"))
    assert "/bytes" not in scrapes[-1] and "/echo" not in scrapes[-1]


def test_openmetrics_when_the_scraper_asks_for_it(sidecar: Sidecar) -> None:
    response = httpx.get(f"{sidecar.admin_url}/metrics",
                         headers={"accept": "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;q=0.5"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    plain = httpx.get(f"{sidecar.admin_url}/metrics")
    assert plain.headers["content-type"].startswith("text/plain") and "# EOF" not in plain.text
    assert 'egress_build_info{' in plain.text and "process_resident_memory_bytes" in plain.text


def test_metrics_disabled_has_no_endpoint(make_sidecar: Callable[..., Sidecar]) -> None:
    sidecar = make_sidecar(metrics={"enabled": False})
    assert httpx.get(f"{sidecar.admin_url}/metrics").status_code == 404


def test_pool_gauges_follow_twenty_slow_downloads_and_reuse_rises_on_the_second_wave(
    make_sidecar: Callable[..., Sidecar], fresh_upstream: Upstream
) -> None:
    sidecar = make_sidecar(routes=[{"name": "up", "prefix": "/up", "upstream": fresh_upstream.base}])
    wave = 20

    def gauges() -> tuple[float, float, float, float]:
        found = samples(scrape(sidecar.admin_url))
        return (total(found, "egress_upstream_connections", state="active"),
                total(found, "egress_upstream_connections", state="idle"),
                total(found, "egress_upstream_connections_opened_total"),
                total(found, "egress_requests_on_reused_connection_total"))

    def download(path: str, results: list[int]) -> None:
        with httpx.Client(base_url=sidecar.url, timeout=30) as client:
            results.append(len(client.get(path).content))

    def run_wave(path: str) -> tuple[list[threading.Thread], list[int]]:
        results: list[int] = []
        threads = [threading.Thread(target=download, args=(path, results)) for _ in range(wave)]
        for thread in threads:
            thread.start()
        return threads, results

    # ~2 s each: 40 chunks of 1 KiB every 50 ms.
    threads, results = run_wave("/up/slow?n=40&interval=0.05")
    try:
        seen = wait_until(lambda: (g := gauges())[0] == wave and g, timeout=15, interval=0.05,
                          message="20 active connections during the downloads")
        assert seen[1] == 0
    finally:
        for thread in threads:
            thread.join(30)
    assert results == [40 * 1024] * wave
    active, idle, opened, reused = wait_until(lambda: (g := gauges())[0] == 0 and g, timeout=10,
                                              message="downloads released their connections")
    assert (active, idle, opened, reused) == (0, wave, wave, 0)

    threads, results = run_wave("/up/bytes?n=1000")
    for thread in threads:
        thread.join(30)
    assert results == [1000] * wave
    active, idle, opened, reused = gauges()
    # Every request of the second wave went out on one of the 20 open connections.
    assert (opened, reused) == (wave, wave)
    assert active == 0 and idle == wave
    assert fresh_upstream.connections == wave
