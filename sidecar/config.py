"""The sidecar's configuration: one frozen object, built and validated once at start.

Every field has a default here, so `egress-sidecar run` works with no file. A YAML file
overrides any field (dicts merge key by key, lists replace), then a few environment
variables override the common fields. Validation is msgspec's: an error names the key
path (`$.pool.max_connections`) and the problem, and start-up stops.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec

from sidecar.policy.addresses import parse_ip_literal
from sidecar.policy.hostnames import canonical_host, check_patterns, never_applies


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the problem."""


class Seconds(float):
    """A duration in seconds, written in config as `5s`, `250ms`, `1m`, `1.5s` or a bare number."""

    _PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
    _UNITS: ClassVar[dict[str | None, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

    @classmethod
    def parse(cls, value: object) -> Seconds:
        if isinstance(value, bool):
            raise TypeError("expected a duration like `5s` or `250ms`")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            match = cls._PATTERN.match(value)
            if not match:
                raise ValueError(f"expected a duration like `5s` or `250ms`, got {value!r}")
            number = float(match.group(1)) * cls._UNITS[match.group(2)]
        else:
            raise TypeError(f"expected a duration like `5s` or `250ms`, got {value!r}")
        if number < 0:
            raise ValueError("a duration cannot be negative")
        return cls(number)

    def __repr__(self) -> str:
        return f"{float(self):g}s"


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Seconds:
        return Seconds.parse(value)
    raise NotImplementedError(f"unsupported config type {kind!r}")


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Seconds):
        return f"{float(value):g}s"
    raise NotImplementedError(f"cannot encode {type(value)!r}")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base for every config section: immutable, unknown keys are errors (typos fail loudly)."""


class Listen(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: int = 15001
    # Binding anywhere but loopback turns the sidecar into a proxy other pods can use:
    # it must be asked for explicitly.
    allow_non_loopback: bool = False
    # uvicorn's HTTP parser: httptools (fast, the default) or h11 (pure Python).
    http: Literal["httptools", "h11"] = "httptools"
    # The egress lock's transparent listener (on 127.0.0.1 and ::1): connections the lock's
    # rules redirect arrive here. null: not opened.
    transparent_port: int | None = 15006


class AdminListen(_Section, frozen=True):
    host: str = "0.0.0.0"
    port: int = 15090


class PoolSettings(_Section, frozen=True):
    max_connections: int = 100
    # httpcore counts every connection against the keep-alive limit, so a lower value makes
    # it close and re-handshake connections under load: it equals max_connections, and
    # either one written alone sets both (`_pool_follows`).
    max_keepalive_connections: int = 100
    keepalive_expiry: Seconds = Seconds(60)
    http2: bool = False


class Timeouts(_Section, frozen=True):
    connect: Seconds = Seconds(5)
    read: Seconds = Seconds(30)
    write: Seconds = Seconds(30)
    pool: Seconds = Seconds(1)
    # A CONNECT tunnel with no byte either way for this long is closed. Long, since clients
    # keep their connections to an API open between calls (sidecar/tunnel/tunnels.py).
    tunnel_idle: Seconds = Seconds(3600)


class RouteTimeouts(_Section, frozen=True):
    """Per-route timeouts; a field left out takes the global value."""

    connect: Seconds | None = None
    read: Seconds | None = None
    write: Seconds | None = None
    pool: Seconds | None = None


class TLS(_Section, frozen=True):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Verification is never off unless a route says so explicitly; start-up logs a warning.
    insecure_skip_verify: bool = False


class Policy(_Section, frozen=True):
    # report: what the host rules would refuse is forwarded, logged and counted as would_deny;
    # the address rules (private, metadata, loopback, the sidecar itself) hold in every mode.
    mode: Literal["enforce", "report"] = "enforce"
    default: Literal["allow-public", "deny"] = "allow-public"
    allow_hosts: list[str] = []
    deny_hosts: list[str] = []
    allow_cidrs: list[str] = []
    # Destinations reached over plain HTTP instead of HTTPS (forward-proxy form only).
    plain_http_hosts: list[str] = []
    # Cloud metadata endpoints: deny (every request refused as denied_ip), or identity (only
    # the workload's own credential paths, through the sidecar; sidecar/policy/metadata.py).
    metadata: Literal["deny", "identity"] = "deny"
    # Ports a CONNECT tunnel may reach (403 denied_port otherwise).
    connect_ports: list[int] = msgspec.field(default_factory=lambda: [443])
    # A tunnel whose first client bytes are not a TLS ClientHello is refused unless this is true.
    connect_plaintext: bool = False


class RetryBudget(_Section, frozen=True):
    percent: float = 20.0
    window: Seconds = Seconds(10)
    min_retries: int = 3


class Retries(_Section, frozen=True):
    """A route's retries (sidecar/resilience/retry.py). Only tries that failed before a response started, or
    answered with a status listed in `on`, of a method in `methods`, are retried."""

    attempts: int = 0  # retries after the first try
    on: list[str | int] = msgspec.field(default_factory=lambda: ["connect", "reset"])
    methods: list[str] = msgspec.field(default_factory=lambda: ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])
    backoff_base: Seconds = Seconds(0.025)
    backoff_max: Seconds = Seconds(0.25)
    # A streamed request body is kept for a retry up to this size; a larger one is not retried
    # once any of it went out (Linkerd's rule: bodies over 64 KiB are never retried).
    max_body_bytes: int = 65536
    budget: RetryBudget = RetryBudget()


class CircuitBreaker(_Section, frozen=True):
    """Per upstream host:port (sidecar/resilience/breaker.py): open after `consecutive_failures` failures
    within `window`, fail fast for `cooldown`, then let one probe through."""

    consecutive_failures: int = 0  # 0: off
    window: Seconds = Seconds(10)
    cooldown: Seconds = Seconds(5)


class HeaderValue(_Section, frozen=True):
    """A header a route injects: a literal `value`, or a secret read from `file`."""

    value: str | None = None
    file: str | None = None
    template: str = "{}"


class Route(_Section, frozen=True):
    """A named route: a path `prefix` sent to `upstream`, and/or `match_hosts` (exact names or
    `*.suffix`) whose forward-proxy and intercepted requests take this route's settings while
    going to the host the app asked for. Hosts a route matches are intercepted too (intercept.py)."""

    name: str
    prefix: str | None = None
    upstream: str | None = None
    match_hosts: list[str] = []
    timeouts: RouteTimeouts = RouteTimeouts()
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    headers: dict[str, HeaderValue] = {}
    tls: TLS | None = None
    http2: bool | None = None
    max_in_flight: int | None = None


class MetricsSettings(_Section, frozen=True):
    enabled: bool = True
    max_upstreams: int = 100


class Log(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    access: bool = True


class Drain(_Section, frozen=True):
    grace: Seconds = Seconds(20)


class Forwarding(_Section, frozen=True):
    """Headers a proxy may add; off by default so the upstream sees exactly the app's request."""

    via: bool = False
    x_forwarded_for: bool = False
    request_id: bool = True  # pass (or generate) x-request-id upstream


class Limits(_Section, frozen=True):
    """Caps on what one client may send (limits.py enforces the head ones, forward.py the body one)."""

    max_in_flight: int = 1000
    max_request_line: int = 8192  # the request target's length, bytes (414 uri_too_long)
    max_header_bytes: int = 65536  # header names + values, bytes (431 header_too_large)
    max_headers: int = 100  # header fields (431 header_too_large)
    header_timeout: Seconds = Seconds(10)  # the whole request head must arrive within this
    body_idle_timeout: Seconds = Seconds(60)  # longest silence inside a request body
    max_tunnels: int = 1000  # open CONNECT tunnels; past it 503 overloaded


class Intercept(_Section, frozen=True):
    """Opt-in TLS interception inside CONNECT tunnels (sidecar/intercept/interceptor.py, intercept_ca.py)."""

    # Exact names and `*.suffix`, matched like host rules; routes' match_hosts are added to these.
    hosts: list[str] = []
    # Where the per-pod CA certificate and trust bundle are written (an emptyDir shared with the
    # app containers). Never the CA key: that lives only in the sidecar's memory.
    ca_dir: str = "/var/run/egress-sidecar/ca"
    # The CA's lifetime from start; leaves are cut to it. Short, so a copied CA dies soon.
    ca_validity: Seconds = Seconds(7 * 86400)
    # Minted leaf certificates kept (least recently used dropped first).
    leaf_cache: int = 1000


class Inventory(_Section, frozen=True):
    """The egress inventory (admin /destinations): destinations seen, least recently seen evicted first."""

    max_entries: int = 2000  # 0: off


class Lock(_Section, frozen=True):
    """The egress lock (`egress-sidecar lock`, sidecar/lock/install.py): holes in it, and captured plain HTTP."""

    skip_cidrs: list[str] = []  # destinations the lock leaves alone: a hole, not covered by policy
    skip_ports: list[int] = []  # destination ports (TCP and UDP) left alone: a hole too
    # Captured plain-HTTP calls to these hosts go out over HTTPS on 443 (TLS origination);
    # any other captured plain-HTTP call goes to http:// on the port the app dialled.
    originate_tls_hosts: list[str] = []


class Config(_Section, frozen=True):
    listen: Listen = Listen()
    admin: AdminListen = AdminListen()
    pool: PoolSettings = PoolSettings()
    timeouts: Timeouts = Timeouts()
    tls: TLS = TLS()
    policy: Policy = Policy()
    # Static name -> address(es), like curl --resolve; consulted before the system resolver.
    resolve: dict[str, str | list[str]] = {}
    routes: list[Route] = []
    forwarding: Forwarding = Forwarding()
    limits: Limits = Limits()
    intercept: Intercept = Intercept()
    inventory: Inventory = Inventory()
    metrics: MetricsSettings = MetricsSettings()
    log: Log = Log()
    drain: Drain = Drain()
    lock: Lock = Lock()


# Environment variables for the fields a pod spec most often sets, and their key paths.
ENV_OVERRIDES: Mapping[str, tuple[str, ...]] = {
    "EGRESS_LISTEN_HOST": ("listen", "host"),
    "EGRESS_LISTEN_PORT": ("listen", "port"),
    "EGRESS_ADMIN_HOST": ("admin", "host"),
    "EGRESS_ADMIN_PORT": ("admin", "port"),
    "EGRESS_LOG_LEVEL": ("log", "level"),
    "EGRESS_LOG_FORMAT": ("log", "format"),
    "EGRESS_POLICY_DEFAULT": ("policy", "default"),
    "EGRESS_POLICY_MODE": ("policy", "mode"),
    "EGRESS_DRAIN_GRACE": ("drain", "grace"),
    "EGRESS_POOL_MAX_CONNECTIONS": ("pool", "max_connections"),
    "EGRESS_POOL_HTTP2": ("pool", "http2"),
}


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two raw config mappings: dicts merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The raw config mapping that the EGRESS_* environment variables describe."""
    raw: dict[str, Any] = {}
    for name, path in ENV_OVERRIDES.items():
        if name not in environ:
            continue
        import yaml  # first use only (see read_yaml)

        try:
            value: Any = yaml.safe_load(environ[name]) if environ[name] != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid config: environment variable {name} is not a YAML value: "
                              f"{yaml_problem(exc)}") from None
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return raw


def _pool_follows(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """`pool.max_connections` and `pool.max_keepalive_connections` must be equal: the one left out
    takes the value of the one written, so only two written values that differ are an error."""
    pool = raw.get("pool")
    if not isinstance(pool, Mapping):
        return raw
    keys = ("max_connections", "max_keepalive_connections")
    given = [key for key in keys if key in pool]
    if len(given) != 1:
        return raw
    missing = keys[1] if given[0] == keys[0] else keys[0]
    return {**raw, "pool": {**pool, missing: pool[given[0]]}}


def from_mapping(raw: Mapping[str, Any]) -> Config:
    """Validate a raw mapping into a Config, or raise ConfigError naming the key."""
    try:
        config = msgspec.convert(_pool_follows(raw), Config, dec_hook=_dec_hook, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    check_semantics(config)
    return config


def check_semantics(config: Config) -> None:
    """Rules that span fields or need more than a type; each error names its key."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"invalid config: {problem} - at `$.{key}`")

    for key, port in (("listen.port", config.listen.port), ("admin.port", config.admin.port)):
        if not 0 <= port <= 65535:
            fail(key, f"port {port} is out of range 0-65535")
    if config.listen.port == config.admin.port and config.listen.port != 0:
        fail("admin.port", "the admin port must differ from listen.port")
    transparent = config.listen.transparent_port
    if transparent is not None:
        if not 0 <= transparent <= 65535:
            fail("listen.transparent_port", f"port {transparent} is out of range 0-65535")
        if transparent != 0 and transparent in (config.listen.port, config.admin.port):
            fail("listen.transparent_port", "must differ from listen.port and admin.port")
    for index, cidr in enumerate(config.lock.skip_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            fail(f"lock.skip_cidrs[{index}]", f"{cidr!r} is not a CIDR range")
    for index, port in enumerate(config.lock.skip_ports):
        if not 0 < port <= 65535:
            fail(f"lock.skip_ports[{index}]", f"port {port} is out of range 1-65535")
    problem = check_patterns(config.lock.originate_tls_hosts)
    if problem is not None:
        fail("lock.originate_tls_hosts", f"invalid host pattern {problem}")
    if not is_loopback_host(config.listen.host) and not config.listen.allow_non_loopback:
        fail("listen.host", f"{config.listen.host!r} is not loopback; set listen.allow_non_loopback: true "
             "to expose the proxy beyond the pod (other pods could use it as an open proxy)")
    if config.pool.max_connections < 1:
        fail("pool.max_connections", "must be at least 1")
    if config.pool.max_keepalive_connections != config.pool.max_connections:
        fail("pool.max_keepalive_connections", "must equal pool.max_connections; leave it out to follow "
             "pool.max_connections (a lower value makes httpcore close and re-open connections under load)")
    limits = config.limits
    for key, number in (("max_request_line", limits.max_request_line), ("max_header_bytes", limits.max_header_bytes),
                        ("max_headers", limits.max_headers)):
        if number < 1:
            fail(f"limits.{key}", "must be at least 1")
    for key, seconds in (("header_timeout", limits.header_timeout), ("body_idle_timeout", limits.body_idle_timeout)):
        if float(seconds) <= 0:
            fail(f"limits.{key}", "must be longer than 0s")
    for index, cidr in enumerate(config.policy.allow_cidrs):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            fail(f"policy.allow_cidrs[{index}]", f"{cidr!r} is not a CIDR range")
    for key in ("allow_hosts", "deny_hosts", "plain_http_hosts"):
        problem = check_patterns(getattr(config.policy, key))
        if problem is not None:
            fail(f"policy.{key}", f"invalid host pattern {problem}")
    for key in ("allow_hosts", "plain_http_hosts"):
        patterns = getattr(config.policy, key)
        shadowed = never_applies(patterns, config.policy.deny_hosts)
        if shadowed is not None:
            fail(f"policy.{key}[{patterns.index(shadowed)}]", f"{shadowed!r} can never apply: policy.deny_hosts "
                 "denies every host it matches (deny wins)")
    for name, addresses in config.resolve.items():
        try:
            canonical_host(name)
        except ValueError as exc:
            fail(f"resolve.{name}", f"{name!r} is not a host name: {exc}")
        for address in [addresses] if isinstance(addresses, str) else addresses:
            try:
                ipaddress.ip_address(address.strip("[]"))
            except ValueError:
                fail(f"resolve.{name}", f"{address!r} is not an IP address")
        if not addresses:
            fail(f"resolve.{name}", "needs at least one address")
    if config.tls.insecure_skip_verify:
        fail("tls.insecure_skip_verify", "certificate verification can only be turned off per route "
             "(routes[].tls.insecure_skip_verify), never for every destination")
    for key, tls in [("tls", config.tls)] + [(f"routes[{i}].tls", r.tls) for i, r in enumerate(config.routes)]:
        if tls is not None and tls.key_file is not None and tls.cert_file is None:
            fail(f"{key}.key_file", "a client key needs tls.cert_file too")
    seen: set[str] = set()
    prefixes: dict[str, int] = {}
    for index, route in enumerate(config.routes):
        where = f"routes[{index}]"
        if route.name in seen:
            fail(f"{where}.name", f"duplicate route name {route.name!r}")
        seen.add(route.name)
        if route.prefix is None and route.upstream is None and not route.match_hosts:
            fail(f"{where}", "a route needs `prefix` and `upstream`, or `match_hosts`")
        if (route.prefix is None) != (route.upstream is None):
            fail(f"{where}.{'upstream' if route.upstream is None else 'prefix'}",
                 "`prefix` and `upstream` go together")
        if route.prefix is not None and (not route.prefix.startswith("/") or route.prefix.rstrip("/") == ""):
            fail(f"{where}.prefix", f"{route.prefix!r} must start with '/' and name a path segment")
        if route.prefix is not None:
            # Routing compares prefixes without their trailing slash: `/a` and `/a/` are one prefix,
            # and only one route could ever get its requests.
            prefix = route.prefix.rstrip("/")
            if prefix in prefixes:
                fail(f"{where}.prefix", f"{route.prefix!r} is already the prefix of routes[{prefixes[prefix]}] "
                     f"({config.routes[prefixes[prefix]].name!r}); this route could never apply")
            prefixes[prefix] = index
        if route.upstream is not None and re.match(r"^https?://[^?#]*[?#]", route.upstream):
            fail(f"{where}.upstream", f"{route.upstream!r} carries a query string or fragment; an upstream is "
                 "a base URL (scheme, host, optional path): the app's own query is sent as it wrote it")
        if route.upstream is not None and not re.match(r"^https?://[^/?#]+(/[^?#]*)?$", route.upstream):
            fail(f"{where}.upstream", f"{route.upstream!r} must be an http:// or https:// base URL")
        problem = check_patterns(route.match_hosts)
        if problem is not None or "*" in (h.strip() for h in route.match_hosts):
            fail(f"{where}.match_hosts", f"invalid host pattern {problem or repr('*')} (a route matches "
                 "exact names or *.suffix, never every host)")
        for header, source in route.headers.items():
            if (source.value is None) == (source.file is None):
                fail(f"{where}.headers.{header}", "set exactly one of `value` or `file`")
            if "{}" not in source.template:
                fail(f"{where}.headers.{header}.template", "the template must contain {}")
        if route.max_in_flight is not None and route.max_in_flight < 1:
            fail(f"{where}.max_in_flight", "must be at least 1")
        if route.retries is not None:
            retries = route.retries
            for reason in retries.on:
                if isinstance(reason, str) and reason not in ("connect", "reset", "timeout"):
                    fail(f"{where}.retries.on", f"unknown retry reason {reason!r} "
                         "(connect, reset, timeout, or a status code)")
                if isinstance(reason, int) and not 400 <= reason <= 599:
                    fail(f"{where}.retries.on", f"status {reason} is not an error status (400-599)")
            for key, value in (("attempts", retries.attempts), ("max_body_bytes", retries.max_body_bytes),
                               ("budget.min_retries", retries.budget.min_retries),
                               ("budget.percent", retries.budget.percent)):
                if value < 0:
                    fail(f"{where}.retries.{key}", "cannot be negative")
            if float(retries.budget.window) <= 0:
                fail(f"{where}.retries.budget.window", "must be longer than 0s")
            for method in retries.methods:
                if not method.isalpha() or not method.isupper():
                    fail(f"{where}.retries.methods", f"{method!r} is not an upper-case HTTP method")
        breaker = route.circuit_breaker
        if breaker is not None:
            if breaker.consecutive_failures < 0:
                fail(f"{where}.circuit_breaker.consecutive_failures", "cannot be negative (0: off)")
            if float(breaker.window) <= 0:
                fail(f"{where}.circuit_breaker.window", "must be longer than 0s")
    if config.limits.max_in_flight < 1:
        fail("limits.max_in_flight", "must be at least 1")
    if config.inventory.max_entries < 0:
        fail("inventory.max_entries", "cannot be negative (0: off)")
    if config.limits.max_tunnels < 0:
        fail("limits.max_tunnels", "cannot be negative (0: CONNECT refused)")
    for index, port in enumerate(config.policy.connect_ports):
        if not 0 < port < 65536:
            fail(f"policy.connect_ports[{index}]", f"port {port} is out of range 1-65535")
    if float(config.timeouts.tunnel_idle) <= 0:
        fail("timeouts.tunnel_idle", "must be longer than 0s")
    intercept = config.intercept
    problem = check_patterns(intercept.hosts)
    if problem is not None or "*" in (h.strip() for h in intercept.hosts):
        fail("intercept.hosts", f"invalid host pattern {problem or repr('*')} (exact names or *.suffix; "
             "intercepting every host would break every certificate-pinning client)")
    for index, host in enumerate(intercept.hosts):
        try:
            literal = parse_ip_literal(host.strip().removeprefix("*."))
        except ValueError:
            literal = None
        if literal is not None:
            fail(f"intercept.hosts[{index}]", f"{host!r} is an IP address: only names can be intercepted "
                 "(the CA's name constraints exclude every address)")
    if not os.path.isabs(intercept.ca_dir):
        fail("intercept.ca_dir", f"{intercept.ca_dir!r} must be an absolute path")
    if float(intercept.ca_validity) < 3600:
        fail("intercept.ca_validity", "must be at least 1h")
    if intercept.leaf_cache < 1:
        fail("intercept.leaf_cache", "must be at least 1")


def is_loopback_host(host: str) -> bool:
    """Whether a listen host is loopback (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_yaml(path: str | os.PathLike[str], what: str, error: type[Exception]) -> Any:
    """Parse a YAML file, raising `error` with a message that names the file and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    import yaml  # imported on first use: `run` with no file and no EGRESS_* variable parses no YAML

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {yaml_problem(exc)}") from None


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line, with the line and column where it was found (1-based).

    PyYAML's own text names the source `"<unicode string>"` and spans several lines.
    """
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}, {problem}" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}" if mark is not None else " ".join(text.split())


def embedded_default_text() -> str:
    """The documented default config shipped in the package (what the Helm chart mounts)."""
    from importlib import resources  # ~8 ms of imports that only print-default-config needs

    return resources.files("sidecar").joinpath("default.yaml").read_text()


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective config: defaults, then the YAML file, then environment variables."""
    raw: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path, "config file", ConfigError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded
    raw = merge(raw, env_overrides(os.environ if environ is None else environ))
    return from_mapping(raw)


def config_sha256(config: Config) -> str:
    """The effective config's identity: sha256 of its canonical JSON (egress_config_info, /config,
    and what `check-config` prints, so a reviewer can tell which file is live)."""
    import hashlib

    return hashlib.sha256(msgspec.json.encode(to_builtins(config), order="sorted")).hexdigest()


def to_builtins(config: Config) -> Any:
    """Plain data for display (`/config`); callers redact secrets."""
    return msgspec.to_builtins(config, enc_hook=_enc_hook)
