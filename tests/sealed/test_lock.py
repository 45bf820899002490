"""The egress lock, shown in a pod whose destinations are off-box (tests/sealed/pod.py).

The real `egress-sidecar lock` installs its rules in the pod namespace, the real sidecar runs
there as UID 65532, and an app (UID 1000, no proxy settings) connects DIRECTLY to addresses
in the world namespace: the metadata endpoint, a private address, a "public" one (catching
listeners on [::]:80 and [::]:443 there record any connection that leaks), and an allowed
upstream on 8080 (plain HTTP) and 8443 (TLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest
import trustme

from tests.sealed import pod
from tests.sealed.catchers import Catchers, remember_sni
from tests.sealed.locked import PORTS, SIDECAR_UID, LockedPod, UDPCatcher, start
from tests.upstream import Upstream, UpstreamServer, random_bytes, wait_until

MIB = 1024 * 1024
ALLOWED_V4, ALLOWED_V6 = "93.184.216.34", "2001:4860:4860::8888"
CONFIG = {
    "policy": {"default": "deny", "allow_hosts": ["allowed.test", "allowed6.test", "secure.test"],
               "connect_ports": [443, 8443]},
    "resolve": {"allowed.test": ALLOWED_V4, "allowed6.test": ALLOWED_V6, "secure.test": ALLOWED_V4},
    "lock": {"originate_tls_hosts": ["secure.test"]},
    "limits": {"header_timeout": "2s"},  # a silent captured connection is closed after this
}


class World:
    """What lives in the world namespace: catchers, upstreams, UDP catchers."""

    def __init__(self, net: pod.PodNetwork, ca: trustme.CA) -> None:
        self.net = net
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("allowed.test", "allowed6.test", "secure.test", "1.1.1.1", "10.0.0.1").configure_cert(context)
        self.catchers: Catchers = pod.in_netns(net.world, Catchers, {80: None, 443: remember_sni(context)})
        self.servers = []
        self.upstreams: dict[tuple[str, int], Upstream] = {}
        for host in (ALLOWED_V4, ALLOWED_V6):
            for port, tls in ((8080, None), (8443, context)):
                server = UpstreamServer(tls, host=host, port=port, before=pod.enter(net.world))
                self.upstreams[(host, port)] = server.start()
                self.servers.append(server)
        self.dns = pod.in_netns(net.world, UDPCatcher.bind, pod.WORLD_V4, 53)
        self.quic = pod.in_netns(net.world, UDPCatcher.bind, "::", 443)

    def stop(self) -> None:
        self.catchers.stop()
        for server in self.servers:
            server.stop()
        self.dns.stop()
        self.quic.stop()


@pytest.fixture(scope="module", params=["nft", "iptables"])
def world_and_pod(ca: trustme.CA, request: pytest.FixtureRequest) -> Iterator[tuple[World, LockedPod]]:
    """One pod per backend the lock can use: every test runs against both."""
    holder: list[World] = []

    def make_world(locked: LockedPod) -> None:
        holder.append(World(locked.net, ca))

    locked = start(request.param, ca.cert_pem.bytes(), CONFIG, backend=request.param, before_lock=make_world)
    yield holder[0], locked
    holder[0].stop()
    locked.stop()


@pytest.fixture
def world(world_and_pod: tuple[World, LockedPod]) -> World:
    world_and_pod[0].catchers.clear()
    return world_and_pod[0]


@pytest.fixture
def locked(world_and_pod: tuple[World, LockedPod]) -> LockedPod:
    return world_and_pod[1]


def _barrier(world: World) -> None:
    pod.in_netns(world.net.world, world.catchers.barrier)  # the sentinel connection is made in the world


def _no_leak(world: World) -> None:
    _barrier(world)
    assert world.catchers.connections() == []


def test_the_pod_and_world_are_sealed(locked: LockedPod) -> None:
    assert pod.not_sealed_reason(locked.net) is None


def test_lock_prints_what_it_installed_and_a_second_run_replaces_it(locked: LockedPod) -> None:
    assert f"installed with {locked.backend}" in locked.lock_output
    again = locked.lock("--backend", locked.backend)
    assert again.returncode == 0, again.stderr
    if locked.backend == "nft":
        assert f"redirect to :{PORTS['transparent']}" in locked.lock_output
        assert f"meta skuid {SIDECAR_UID} return" in locked.lock_output
        listed = locked.net.run(["nft", "list", "ruleset"]).stdout.decode()
        assert listed.count("table inet egress_lock") == 1
        assert listed.count("redirect to :") == 1
        return
    assert f"-A EGRESS_OUTPUT -p tcp -j REDIRECT --to-ports {PORTS['transparent']}" in locked.lock_output
    assert f"-A EGRESS_OUTPUT -m owner --uid-owner {SIDECAR_UID} -j RETURN" in locked.lock_output
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            listed = locked.net.run([tool, "-t", table, "-S"]).stdout.decode()
            assert listed.count("-j EGRESS_OUTPUT") == 1, listed  # the jump, once
            assert listed.count("-A EGRESS_OUTPUT -o lo -j RETURN") == 1, listed


def test_lock_refuses_clearly_without_net_admin(locked: LockedPod) -> None:
    import sys

    result = locked.net.run([sys.executable, "-m", "sidecar", "lock", "--config", str(locked.config_path)],
                            uid=SIDECAR_UID)
    assert result.returncode == 1
    assert b"no CAP_NET_ADMIN" in result.stderr and b"nothing was installed" in result.stderr


@pytest.mark.parametrize(("host", "address"), [("allowed.test", ALLOWED_V4), ("allowed6.test", ALLOWED_V6)])
def test_allowed_plain_http_is_captured_and_served_byte_exact(
    world: World, locked: LockedPod, host: str, address: str
) -> None:
    upstream = world.upstreams[(address, 8080)]
    before = len(upstream.requests)
    shown = f"[{address}]" if ":" in address else address
    status, headers, body, code = locked.curl(f"http://{host}:8080/bytes?n={MIB}&seed=7",
                                              "--resolve", f"{host}:8080:{shown}")
    assert (status, code) == (200, 0), headers
    assert body == random_bytes(MIB, 7)
    assert len(upstream.requests) == before + 1
    assert upstream.requests[-1].target == f"/bytes?n={MIB}&seed=7"
    # The sidecar's own connection went out over the pod's interface, not through itself.
    assert upstream.peers[-1] == (pod.POD_V6 if ":" in address else pod.POD_V4)
    wait_until(lambda: any(e.get("upstream") == f"{host}:8080" and e.get("status") == 200 and
                           e.get("path") == "/bytes" for e in locked.logs()), 5, message="access log line")
    _no_leak(world)


@pytest.mark.parametrize(("host", "address"), [("allowed.test", ALLOWED_V4), ("allowed6.test", ALLOWED_V6)])
def test_allowed_tls_is_captured_and_tunnelled_byte_exact(
    world: World, locked: LockedPod, host: str, address: str
) -> None:
    upstream = world.upstreams[(address, 8443)]
    before = len(upstream.requests)
    shown = f"[{address}]" if ":" in address else address
    status, headers, body, code = locked.curl(f"https://{host}:8443/bytes?n={MIB}&seed=9",
                                              "--resolve", f"{host}:8443:{shown}",
                                              "--cacert", str(locked.workdir / "ca.pem"))
    assert (status, code) == (200, 0), headers
    assert body == random_bytes(MIB, 9)
    assert len(upstream.requests) == before + 1
    assert upstream.peers[-1] == (pod.POD_V6 if ":" in address else pod.POD_V4)  # not through the sidecar again
    line = wait_until(lambda: next((e for e in locked.logs() if e.get("event") == "tunnel"
                                    and e.get("upstream") == f"{host}:8443" and e.get("bytes_out", 0) > MIB),
                                   None), 5, message="the tunnel's log line")
    assert (line["method"], line["address"], line["sni"]) == ("transparent", address, host), line
    _no_leak(world)


def test_tls_whose_sni_does_not_lead_to_the_dialled_address_is_refused(world: World, locked: LockedPod) -> None:
    # An allowed name in the SNI, a private address dialled: the name resolves elsewhere.
    status, _headers, _body, code = locked.curl("https://allowed.test/", "--resolve", "allowed.test:443:10.0.0.1",
                                                "--cacert", str(locked.workdir / "ca.pem"))
    assert status == 0 and code != 0
    line = wait_until(lambda: next((e for e in locked.logs() if "sni_mismatch" in e.get("detail", "")
                                    and e.get("upstream") == "10.0.0.1:443"), None), 5, message="refusal")
    assert line["kind"] == "denied_host"
    _no_leak(world)


def test_plain_http_to_an_originate_tls_host_leaves_encrypted_on_443(world: World, locked: LockedPod) -> None:
    status, _headers, body, _code = locked.curl("http://secure.test/v1/x", "--resolve", f"secure.test:80:{ALLOWED_V4}")
    assert (status, body) == (200, f"caught {ALLOWED_V4}:443".encode())  # the TLS catcher answered
    _barrier(world)
    [caught] = world.catchers.connections()
    assert (caught.address, caught.port, caught.sni) == (ALLOWED_V4, 443, "secure.test")
    assert caught.request_head.startswith(b"GET /v1/x HTTP/1.1")


@pytest.mark.parametrize(("url", "kind"), [
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "denied_ip"),
    ("http://10.0.0.1/", "denied_ip"),
    ("http://1.1.1.1/", "denied_host"),  # public, but policy.default: deny
    ("http://[2606:4700:4700::1111]/", "denied_host"),
    ("http://[fd00:ec2::254]/latest/api/token", "denied_ip"),
])
def test_direct_plain_http_to_denied_destinations_is_refused_with_no_connection(
    world: World, locked: LockedPod, url: str, kind: str
) -> None:
    status, headers, _body, _code = locked.curl(url)
    assert status == 403
    assert headers.get("x-egress-error") == kind
    _no_leak(world)


def test_a_name_the_policy_allows_cannot_smuggle_a_denied_address(world: World, locked: LockedPod) -> None:
    # The Host header decides: the request goes where allowed.test resolves, never to the address dialled.
    status, _headers, body, _code = locked.curl("http://allowed.test/", "--resolve", "allowed.test:80:10.0.0.1")
    assert (status, body) == (200, f"caught {ALLOWED_V4}:80".encode())
    _barrier(world)
    assert [(c.address, c.port) for c in world.catchers.connections()] == [(ALLOWED_V4, 80)]


@pytest.mark.parametrize(("address", "reason"), [
    ("10.0.0.1", "reason=private"), ("1.1.1.1", "reason=not_allowed"), ("2606:4700:4700::1111", "reason=not_allowed")])
def test_direct_tls_without_sni_is_decided_by_address_rules_and_default(
    world: World, locked: LockedPod, address: str, reason: str
) -> None:
    shown = f"[{address}]" if ":" in address else address
    status, _headers, _body, code = locked.curl(f"https://{shown}/", "--insecure")  # curl sends no SNI for an IP
    assert status == 0 and code != 0
    wait_until(lambda: any(reason in e.get("detail", "") and address in e.get("upstream", "")
                           for e in locked.logs()), 5, message="refusal log line")
    _no_leak(world)


def test_udp_other_than_dns_is_dropped_and_counted(world: World, locked: LockedPod) -> None:
    before = _drop_counter(locked)
    results = locked.app_python(
        "import json, socket\n"
        "out = {}\n"
        f"for name, host, port in [('quic4', '1.1.1.1', 443), ('quic6', '2606:4700:4700::1111', 443),"
        f" ('dns', '{pod.WORLD_V4}', 53), ('dns6', '{pod.WORLD_V6}', 53)]:\n"
        "    family = socket.AF_INET6 if ':' in host else socket.AF_INET\n"
        "    with socket.socket(family, socket.SOCK_DGRAM) as s:\n"
        "        try:\n"
        "            s.sendto(b'probe-' + name.encode(), (host, port)); out[name] = 'sent'\n"
        "        except OSError as exc:\n"
        "            out[name] = exc.strerror\n"
        "print(json.dumps(out))\n"
    )
    assert results["quic4"] == results["quic6"] == "Operation not permitted"  # dropped in OUTPUT
    assert results["dns"] == results["dns6"] == "sent"  # to the resolvers of resolv.conf: allowed
    wait_until(lambda: any(data == b"probe-dns" for _peer, data in world.dns.seen), 5, message="DNS datagram")
    assert world.quic.seen == []
    assert _drop_counter(locked) >= before + 2


def test_tcp_dns_to_the_resolver_goes_direct_and_other_tcp_is_captured(locked: LockedPod) -> None:
    results = locked.app_python(
        "import json, socket\n"
        "out = {}\n"
        f"for port in (53, 54):\n"
        "    try:\n"
        f"        socket.create_connection(('{pod.WORLD_V4}', port), timeout=5).close(); out[port] = 'connected'\n"
        "    except OSError as exc:\n"
        "        out[port] = exc.strerror\n"
        "print(json.dumps(out))\n"
    )
    # Nothing listens on TCP 53 in the world: refused there. Port 54 is captured: the sidecar accepts.
    assert results == {"53": "Connection refused", "54": "connected"}


def _drop_counter(locked: LockedPod) -> int:
    if locked.backend == "nft":
        listed = locked.net.run(["nft", "list", "table", "inet", "egress_lock"]).stdout.decode()
        line = next(line for line in listed.splitlines() if line.strip().endswith("drop"))
        return int(line.split("packets", 1)[1].split()[0])
    total = 0
    for tool in ("iptables", "ip6tables"):
        listed = locked.net.run([tool, "-t", "filter", "-L", "EGRESS_OUTPUT", "-v", "-x", "-n"]).stdout.decode()
        total += sum(int(line.split()[0]) for line in listed.splitlines() if " DROP " in f" {line} ")
    return total


def test_other_protocols_are_refused_and_logged_with_the_original_destination(
    world: World, locked: LockedPod
) -> None:
    closed = locked.app_python(
        "import json, socket\n"
        "s = socket.create_connection(('1.1.1.1', 80), timeout=5)\n"
        "s.sendall(b'SSH-2.0-OpenSSH_9.0\\r\\n')\n"
        "try:\n"
        "    data = s.recv(100)\n"
        "except ConnectionResetError:\n"
        "    data = b''\n"
        "print(json.dumps(data == b''))\n"
    )
    assert closed
    line = wait_until(lambda: next((e for e in locked.logs() if e.get("kind") == "unsupported"
                                    and e.get("upstream") == "1.1.1.1:80"), None), 5, message="refusal log")
    assert "neither HTTP nor TLS" in line["detail"]
    metrics = locked.admin_get("/metrics").text
    assert any(line.startswith("egress_errors_total{") and 'kind="unsupported"' in line
               and 'upstream="1.1.1.1:80"' in line and not line.endswith(" 0.0") for line in metrics.splitlines())
    _no_leak(world)


def test_a_silent_captured_connection_is_closed_and_logged_with_its_destination(
    world: World, locked: LockedPod
) -> None:
    closed = locked.app_python(
        "import json, socket, time\n"
        "s = socket.create_connection(('1.1.1.1', 80), timeout=10)\n"  # waits for a banner, as SMTP does
        "start = time.monotonic()\n"
        "try:\n"
        "    data = s.recv(100)\n"
        "except ConnectionResetError:\n"
        "    data = b''\n"
        "print(json.dumps([data == b'', time.monotonic() - start]))\n"
    )
    assert closed[0] and 1.5 < closed[1] < 8
    wait_until(lambda: any(e.get("kind") == "client_timeout" and e.get("upstream") == "1.1.1.1:80"
                           and "server speaks first" in e.get("detail", "") for e in locked.logs()), 5,
               message="the silent connection's log line")
    _no_leak(world)


def test_connecting_to_the_transparent_listener_itself_is_a_loop(locked: LockedPod) -> None:
    status, headers, _body, _code = locked.curl(f"http://127.0.0.1:{PORTS['transparent']}/")
    assert (status, headers.get("x-egress-error")) == (508, "loop")


def test_the_app_can_still_use_the_sidecar_as_its_proxy(world: World, locked: LockedPod) -> None:
    status, _headers, body, _code = locked.curl(
        "http://allowed.test:8443/bytes?n=1000&seed=3", "--proxy", f"http://127.0.0.1:{PORTS['listen']}")
    assert status == 200 and body == random_bytes(1000, 3)  # forward-proxy form: TLS originated to 8443
    _no_leak(world)
