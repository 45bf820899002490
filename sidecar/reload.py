"""Config reload without restart: on a change of the config file (or of a CA or client certificate
file it names), and on SIGHUP.

A Kubernetes ConfigMap volume is a directory of symlinks, `config.yaml -> ..data/config.yaml`;
on an update the kubelet writes a new timestamped directory and renames a new `..data` link
over the old one (kubernetes/pkg/volume/util/atomic_writer.go), as for Secrets
(sidecar/proxy/credentials.py). So the watcher `stat`s each watched path, following the links,
every `interval` (0.5 s), and reloads when the (device, inode, size, mtime) of one changes: no
inotify (which watches the link, not what it points to, and misses the rename of `..data`),
nothing on the request path.

A reload reads and validates the new config whole (in a thread: YAML parsing is not free),
then builds a complete snapshot (sidecar/runtime.py: routes, policy, pools, resilience,
secrets, TLS contexts) and only then swaps it in with one assignment. Anything that fails
(a bad key, an unreadable secret, a CA file that does not load) leaves the old snapshot in
place, logs `config_rejected` with the message naming the key, and counts
`egress_config_reloads_total{outcome="rejected"}`; no request is dropped either way.
Requests in flight finish under the snapshot they started with; a pool the new config
does not keep (its TLS settings or files changed) is closed once the old snapshot's requests
are done. Listener addresses and ports, the metrics switch, the egress lock and the log format
are fixed for the process: a change to them is logged (`config_restart_needed`) and the rest applies.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from sidecar import preflight
from sidecar.config import Config
from sidecar.observe import log as log_module
from sidecar.runtime import Runtime, Snapshot, build_snapshot

StatKey = tuple[int, int, int, int] | None

# The longest a retired pool waits for the requests of its snapshot before it is closed anyway.
_RETIRE_AFTER = 3600.0
_RETIRE_POLL = 0.25


def restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the settings a running process cannot change kept as they are, and which those were.

    Pure: the caller logs the keys and applies the config returned.
    """
    kept: list[str] = []
    changes: dict[str, Any] = {}
    # lock: the init container wrote the firewall rules from it, the transparent listener read it at start
    for key in ("listen", "admin", "metrics", "lock"):
        if getattr(old, key) != getattr(new, key):
            kept.append(key)
            changes[key] = getattr(old, key)
    if old.log.format != new.log.format:
        kept.append("log.format")
        changes["log"] = msgspec.structs.replace(new.log, format=old.log.format)
    return (msgspec.structs.replace(new, **changes) if changes else new), kept


def changed_sections(old: Config, new: Config) -> list[str]:
    """Top-level keys whose values differ, for the reload's log line."""
    return [name for name in new.__struct_fields__ if getattr(old, name) != getattr(new, name)]


def watched_files(config: Config) -> list[str]:
    """The files whose change triggers a reload besides the config file: CA and client certificates."""
    return list(dict.fromkeys(path for _key, path in tls_file_keys(config)))


def stat_key(path: str) -> StatKey:
    try:
        stat = os.stat(path)  # follows config.yaml -> ..data/config.yaml -> ..<timestamp>/config.yaml
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Reloader:
    """Watches the config (and the certificate files it names) and applies reloads one at a time."""

    def __init__(
        self,
        runtime: Runtime,
        path: str | None,
        *,
        interval: float = 0.5,
        on_applied: Iterable[Callable[[Config], None]] = (),
    ) -> None:
        self.runtime = runtime
        self.path = path
        self.interval = interval
        self.on_applied = list(on_applied)
        self.log = log_module.get("egress.reload")
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: list[Any] = []  # pools replaced by a reload, not closed yet
        self._keys = self._current_keys(runtime.config)

    def _current_keys(self, config: Config) -> dict[str, StatKey]:
        paths = ([self.path] if self.path else []) + watched_files(config)
        return {path: stat_key(path) for path in paths}

    def start(self) -> None:
        """Begin watching (when there is a file to watch)."""
        if self.path is not None:
            self._spawn(self._watch())

    def request(self, trigger: str = "signal") -> None:
        """Reload soon (SIGHUP); safe to call from a signal handler on the loop."""
        self._spawn(self.reload(trigger))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            keys = self._current_keys(self.runtime.config)
            if keys != self._keys:
                changed = [path for path, key in keys.items() if self._keys.get(path) != key]
                self._keys = keys
                await self.reload("file", changed)

    async def reload(self, trigger: str, files: list[str] | None = None) -> bool:
        """Load, validate and apply the config; True when applied. Never raises for a bad config."""
        async with self._lock:
            started = time.perf_counter()
            runtime = self.runtime
            old = runtime.active
            metrics = runtime.observer.metrics
            config: Config | None = None
            try:
                # What `run` and `check-config` check: the config, then every file it names.
                loaded = await asyncio.to_thread(preflight.load_checked, self.path)
                config, restart = restart_only(old.config, loaded)
                snapshot = build_snapshot(config, runtime.observer, runtime.resolve, previous=old,
                                          listeners=runtime.listeners)
            except Exception as exc:  # noqa: BLE001 - a config error, an unreadable secret, a bad CA: keep the old
                self.log.error("config_rejected", trigger=trigger, files=files,
                               error=_message(exc, config), active_sha256=old.sha256)
                if metrics is not None:
                    metrics.config_reload("rejected")
                return False
            assert config is not None
            if restart:
                self.log.warning("config_restart_needed", keys=restart,
                                 message="these settings apply at the next start; the rest applies now")
            retired = snapshot.upstream.retired(old.upstream)
            # Logged under the level in force before it (a reload that raises log.level still says so).
            self.log.info("config_reloaded", trigger=trigger, files=files, sha256=snapshot.sha256,
                          changed=changed_sections(old.config, config), pools_replaced=len(retired),
                          seconds=round(time.perf_counter() - started, 4))
            self._apply(snapshot)
            if retired:
                self._spawn(self._retire(old, retired))
            self._keys = self._current_keys(config)
            if metrics is not None:
                metrics.config_reload("applied")
                metrics.config_loaded(snapshot.sha256)
            return True

    def _apply(self, snapshot: Snapshot) -> None:
        """Swap the snapshot in, then the process-wide settings that follow it (no await: atomic)."""
        config = snapshot.config
        self.runtime.activate(snapshot)
        log_module.set_level(config.log.level)
        self.runtime.observer.reconfigure(config)
        for apply in self.on_applied:
            apply(config)

    async def _retire(self, old: Snapshot, transports: list[Any]) -> None:
        """Close the pools a reload replaced, once the requests that use them are done."""
        self._retiring.extend(transports)
        deadline = time.monotonic() + _RETIRE_AFTER
        while old.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_RETIRE_POLL)
        for transport in transports:
            self._retiring.remove(transport)
            await transport.aclose()
        self.log.info("pools_retired", pools=len(transports), sha256=old.sha256)

    async def aclose(self) -> None:
        """Stop watching; close retired pools now (the process is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transport in self._retiring:
            await transport.aclose()
        self._retiring.clear()


def _message(exc: BaseException, config: Config | None) -> str:
    """The rejection's message; a file that failed to load is named with the key that names it."""
    text = str(exc) or type(exc).__name__
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename:
        text = f"{exc.strerror or exc}: {filename}"
    if config is not None and isinstance(exc, OSError):  # ssl.SSLError too: a CA or certificate file
        keys = [key for key, path in tls_file_keys(config) if filename is None or path == filename]
        if keys:
            text += " - at " + ", ".join(f"`$.{key}`" for key in keys)
    return text


def tls_file_keys(config: Config) -> list[tuple[str, str]]:
    """(key path, file) of every TLS file the config names."""
    found: list[tuple[str, str]] = []
    sections = [("tls", config.tls), *((f"routes[{i}].tls", r.tls) for i, r in enumerate(config.routes))]
    for where, tls in sections:
        if tls is None:
            continue
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, name)
            if path:
                found.append((f"{where}.{name}", path))
    return found
