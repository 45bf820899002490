"""Process lifecycle: two uvicorn servers (data, admin) on one uvloop loop, signals and drain.

Drain (SIGTERM or SIGINT): /readyz turns 503 at once; requests keep being served; when
nothing is in flight (or `drain.grace` has passed, whichever is first) the data listener
stops, the upstream pool is closed and the process exits 0. A second signal exits at once
with 128 + its number (sidecar.lifecycle). Log lines: starting, started (ready), draining,
stopped; uvicorn's own are silenced.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import time
from typing import Any

import uvicorn
import uvloop

import sidecar
from sidecar import lifecycle
from sidecar._compat.uvicorn import SignalFreeServer, protocol_factory
from sidecar.config import Config
from sidecar.ingress import protocol as limits
from sidecar.ingress.accept import BurstAcceptor
from sidecar.ingress.admin import AdminApp, redacted_config
from sidecar.observe import log as log_module
from sidecar.policy.egress import exposure_warnings
from sidecar.policy.hostnames import endpoint
from sidecar.proxy.app import ForwardApp
from sidecar.reload import Reloader
from sidecar.runtime import Runtime, build_runtime
from sidecar.upstream.tls import TLSContexts

# In-flight work still running when the drain deadline passes gets this long, then is cut.
_FORCE_CLOSE_AFTER = 1
# Allocations between young collections (CPython's default: 700); see _tune_gc.
_GC_YOUNG = 10_000


def _uvicorn_config(
    app: Any, host: str, port: int, config: Config, report: limits.Report, http: str = "httptools",
    tunnels: Any = None,
) -> uvicorn.Config:
    if http == "httptools":
        protocol: type[Any] = limits.protocol_class(config.limits, report, tunnels)
    else:
        from sidecar.ingress import h11_protocol  # only when asked for: the run path does not load h11

        protocol = h11_protocol.protocol_class(config.limits, report)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        # The same head limits, deadline and framing rules on both (limits.py, h11_protocol.py);
        # CONNECT tunnels on httptools only.
        http=protocol,
        h11_max_incomplete_event_size=limits.HeadLimits.from_config(config.limits).max_head_bytes,
        ws="none",
        lifespan="off",
        server_header=False,
        date_header=False,
        proxy_headers=False,  # never rewrite the client from X-Forwarded-*
        access_log=False,  # ours is one structured line per request
        log_config=None,
        timeout_keep_alive=int(max(1, float(config.limits.body_idle_timeout))),
        timeout_graceful_shutdown=_FORCE_CLOSE_AFTER,
    )


async def serve(config: Config, runtime: Runtime | None = None, contexts: TLSContexts | None = None,
                config_path: str | None = None) -> int:
    log = log_module.get("egress.server")
    started = time.perf_counter()
    log.info("starting", version=sidecar.__version__, pid=os.getpid())
    runtime = runtime or build_runtime(config, contexts=contexts)
    if runtime.interceptor is not None:
        from sidecar.intercept.ca import trust_roots

        try:
            bundle = runtime.interceptor.write_files(trust_roots(config.tls.ca_file))
        except OSError as exc:
            log.error("startup_failed", key="intercept.ca_dir", ca_dir=config.intercept.ca_dir,
                      problem=f"cannot write the interception CA bundle: {exc.strerror}")
            await runtime.upstream.aclose()
            return 2
        log.info("intercept_ca_written", bundle=str(bundle), hosts=[str(h) for h in
                 runtime.interceptor.hosts_listed], not_after=runtime.interceptor.ca.not_after.isoformat())
    data = SignalFreeServer(_uvicorn_config(ForwardApp(runtime), config.listen.host, config.listen.port, config,
                                            limits.observer_report(runtime.observer, "-"), config.listen.http,
                                            runtime.tunnels))
    try:
        captured = _transparent_server(config, runtime)
    except OSError as exc:
        log.error("startup_failed", transparent=f"127.0.0.1/::1:{config.listen.transparent_port}", error=str(exc))
        await runtime.upstream.aclose()
        return lifecycle.EXIT_STARTUP_FAILED
    admin = SignalFreeServer(_uvicorn_config(AdminApp(runtime), config.admin.host, config.admin.port, config,
                                             limits.observer_report(runtime.observer, "admin")))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:  # the operator insists: no drain, no wait for streams
            code = lifecycle.forced_exit_code(signum)
            log.warning("forced_exit", signal=signal.Signals(signum).name, in_flight=runtime.in_flight,
                        exit_code=code)
            log_module.flush()
            lifecycle.exit_now(code)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    reloader = Reloader(runtime, config_path, on_applied=[functools.partial(_apply_limits, data)])
    loop.add_signal_handler(signal.SIGHUP, reloader.request)

    with lifecycle.StartupErrors() as startup_errors:  # uvicorn's bind errors go into our one line
        data_task = asyncio.create_task(lifecycle.serve(data))
        admin_task = asyncio.create_task(lifecycle.serve(admin))
        servers, tasks = [data, admin], [data_task, admin_task]
        if captured is not None:
            servers.append(captured[0])
            tasks.append(asyncio.create_task(lifecycle.serve(captured[0], sockets=captured[1])))
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                for server in servers:
                    server.should_exit = True
                await asyncio.gather(*tasks, return_exceptions=True)
                log.error("startup_failed", error="; ".join(startup_errors.messages) or "a listener stopped",
                          listen=endpoint(config.listen.host, config.listen.port),
                          admin=endpoint(config.admin.host, config.admin.port))
                await runtime.upstream.aclose()
                return lifecycle.EXIT_STARTUP_FAILED
            await asyncio.sleep(0.005)
    # With port 0 the real ports are known only now; the policy denies them under any spelling.
    hosts = [config.listen.host, config.admin.host]
    for index, server in enumerate(servers):
        for listener in server.servers:
            for sock in listener.sockets:
                name = sock.getsockname()
                runtime.add_listener(hosts[index] if index < 2 else name[0], name[1])
    acceptors = [_burst_acceptor(server) for server in (data, *servers[2:])]  # data and transparent
    if runtime.interceptor is not None and runtime.tunnels is not None and config.listen.http == "httptools":
        runtime.interceptor.attach(runtime.tunnels, _intercepting_protocol(data), float(config.limits.header_timeout),
                                   limits.observer_report(runtime.observer, "-"))
    for warning in exposure_warnings(config):
        log.warning("insecure_setting", message=warning)
    runtime.ready = True
    log.info(
        "started",
        listen=endpoint(config.listen.host, config.listen.port),
        admin=endpoint(config.admin.host, config.admin.port),
        routes=[route.name for route in config.routes],
        policy=config.policy.default,
        ready_seconds=round(time.perf_counter() - started, 4),
    )
    log.info("config", config=redacted_config(runtime))  # the effective config, secrets redacted
    _tune_gc()  # after ready: its full collection takes 10-25 ms that readiness need not wait for
    reloader.start()  # watch the config file (and the certificate files it names)

    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stop_wait, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    drain, cut = "none", 0
    if stop_wait in done:
        drain, cut = await _drain(runtime, data, float(runtime.config.drain.grace), log)
    loop.remove_signal_handler(signal.SIGHUP)
    if runtime.tunnels is not None:
        runtime.tunnels.close_all("drained")  # uvicorn's shutdown does not know them
    for acceptor in acceptors:
        acceptor.close()
    for server in servers[2:]:
        server.should_exit = True
    data.should_exit = True
    await asyncio.gather(data_task, *tasks[2:])
    await reloader.aclose()
    await runtime.upstream.aclose()
    admin.should_exit = True
    await admin_task
    # One line for the whole stop: how the drain ended and how many requests it had to cut.
    (log.warning if drain == "grace_expired" else log.info)("stopped", drain=drain, in_flight_cut=cut)
    return 0


def _apply_limits(server: SignalFreeServer, config: Config) -> None:
    """A reload's head limits, applied to the data listener's protocol class (new requests read them)."""
    protocol = server.config.http_protocol_class
    if isinstance(protocol, type) and issubclass(protocol, limits.LimitedHttpToolsProtocol):
        limits.update_limits(protocol, config.limits)
    elif isinstance(getattr(protocol, "limits", None), limits.HeadLimits):  # the h11 listener's protocol
        protocol.limits = limits.HeadLimits.from_config(config.limits)  # type: ignore[attr-defined]


def _transparent_server(config: Config, runtime: Runtime) -> tuple[SignalFreeServer, list[Any]] | None:
    """The egress lock's transparent listener and its bound sockets, or None when it is off."""
    port = config.listen.transparent_port
    if port is None:
        return None
    from sidecar.ingress import transparent  # only where the listener is on

    sockets = transparent.listening_sockets(port)
    report = limits.observer_report(runtime.observer, "-")
    uvicorn_config = _uvicorn_config(transparent.transparent_app(runtime), "127.0.0.1", port, config, report,
                                     tunnels=runtime.tunnels)
    tls_handler = None
    if runtime.tunnels is not None:
        from sidecar.tunnel.captured_tls import CapturedTLS

        tls_handler = CapturedTLS(runtime.tunnels, runtime.policy, float(config.limits.header_timeout),
                                  transparent.refusal_reporter(runtime.observer)).take
    uvicorn_config.http = transparent.protocol_class(uvicorn_config.http,  # type: ignore[arg-type]
                                                     runtime.observer, tls_handler)
    return SignalFreeServer(uvicorn_config), sockets


def _burst_acceptor(server: SignalFreeServer) -> BurstAcceptor:
    """Accept bursts of new connections at once on the data listener (see accept.py)."""
    acceptor = BurstAcceptor(protocol_factory(server))
    for listener in server.servers:
        for sock in listener.sockets:
            acceptor.watch(sock)
    return acceptor


def _intercepting_protocol(server: SignalFreeServer) -> Any:
    """New instances of the data listener's protocol for intercepted tunnels (sidecar/intercept/interceptor.py)."""
    from sidecar.intercept.terminate import intercepting_protocol

    config = server.config
    protocol: Any = intercepting_protocol(config.http_protocol_class)
    return functools.partial(protocol, config=config,
                             server_state=server.server_state, app_state=server.lifespan.state)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path's back.

    What start-up built (modules, config, router, pools) lives as long as the process:
    `freeze` takes it out of the collector's sight, so a full collection walks only what
    requests allocated. Young collections run every `_GC_YOUNG` allocations instead of 700:
    with 256 requests in flight their objects survived the young collections and were
    promoted, and full collections took ~9 % of the CPU (py-spy, c256). The data path makes
    no reference cycles (tests/transport/test_memory.py runs it with the collector off),
    so collecting less often holds back little memory.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 10, 10)


async def _drain(runtime: Runtime, data: SignalFreeServer, grace: float, log: Any) -> tuple[str, int]:
    """Serve on, not ready, until idle or `grace`; returns (`complete` or `grace_expired`, requests left)."""
    runtime.draining = True
    log.info("draining", in_flight=runtime.in_flight, grace_seconds=grace)
    outcome = "complete"
    try:
        await asyncio.wait_for(runtime.idle.wait(), timeout=grace)
    except TimeoutError:
        outcome = "grace_expired"
    runtime.stopping = True
    return outcome, runtime.in_flight


def run(config: Config, contexts: TLSContexts | None = None, config_path: str | None = None) -> int:
    """Entry point of `egress-sidecar run`; `contexts`: TLS contexts already being built (sidecar.upstream.tls);
    `config_path`: the file to watch and reload (None: SIGHUP re-reads the defaults and environment)."""
    log_module.configure(config.log)
    lifecycle.quiet_uvicorn()
    return uvloop.run(serve(config, contexts=contexts, config_path=config_path))
