"""policy.metadata: identity with the egress lock: a scripted metadata responder on 169.254.169.254
(and the ECS and IPv6 IMDS addresses) in the world namespace; the app (UID 1000) talks to it
directly, as cloud SDKs do, and the lock captures it. The credential exchanges reach the
responder; user-data, other paths and header-less requests are refused before it sees them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trustme

from tests.sealed import pod
from tests.sealed.locked import LockedPod, start
from tests.upstream import wait_until

ANSWERS = {
    ("PUT", "/latest/api/token"): b"TOKEN-1",
    ("GET", "/latest/meta-data/iam/security-credentials/"): b"app-role",
    ("GET", "/latest/meta-data/iam/security-credentials/app-role"): b'{"AccessKeyId": "AKIA"}',
    ("GET", "/latest/user-data"): b"#!/bin/sh secret",
    ("GET", "/computeMetadata/v1/instance/service-accounts/default/token"): b'{"access_token": "ya29"}',
    ("GET", "/computeMetadata/v1/instance/attributes/kube-env"): b"KUBELET_KEY=secret",
    ("GET", "/metadata/identity/oauth2/token"): b'{"access_token": "eyJ"}',
    ("GET", "/v2/credentials/task-1"): b'{"RoleArn": "arn"}',
}


@dataclass
class Responder:
    """A scripted metadata endpoint: answers ANSWERS, records (address, method, path) of each request."""

    seen: list[tuple[str, str, str]] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("sockname")[0]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.seen.append((address, method.decode(), path.decode()))
                body = ANSWERS.get((method.decode(), path.decode()), b"no such path")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def start(self, net: pod.PodNetwork) -> None:
        started = threading.Event()

        async def listen() -> None:
            for host in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254"):
                await asyncio.start_server(self._serve, host, 80)
            started.set()

        def run() -> None:
            pod.enter(net.world)()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(listen())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        assert started.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def metadata_pod(ca: trustme.CA) -> Iterator[tuple[Responder, LockedPod]]:
    responder = Responder()
    locked = start("meta", ca.cert_pem.bytes(), {"policy": {"metadata": "identity"}},
                   before_lock=lambda locked: responder.start(locked.net))
    yield responder, locked
    responder.stop()
    locked.stop()


def _get(locked: LockedPod, url: str, *headers: str, method: str = "GET") -> tuple[int, str | None, bytes]:
    options = ["-X", method]
    for header in headers:
        options += ["-H", header]
    status, response_headers, body, _code = locked.curl(url, *options)
    return status, response_headers.get("x-egress-error"), body


def test_aws_imdsv2_credentials_work_through_the_lock(metadata_pod: tuple[Responder, LockedPod]) -> None:
    responder, locked = metadata_pod
    for base in ("http://169.254.169.254", "http://[fd00:ec2::254]"):
        status, error, token = _get(locked, f"{base}/latest/api/token",
                                    "X-aws-ec2-metadata-token-ttl-seconds: 21600", method="PUT")
        assert (status, error, token) == (200, None, b"TOKEN-1")
        status, error, role = _get(locked, f"{base}/latest/meta-data/iam/security-credentials/",
                                   "X-aws-ec2-metadata-token: TOKEN-1")
        assert (status, role) == (200, b"app-role")
        status, error, creds = _get(locked, f"{base}/latest/meta-data/iam/security-credentials/app-role",
                                    "X-aws-ec2-metadata-token: TOKEN-1")
        assert (status, creds) == (200, b'{"AccessKeyId": "AKIA"}')
    assert ("fd00:ec2::254", "PUT", "/latest/api/token") in responder.seen


@pytest.mark.parametrize(("url", "headers"), [
    ("http://169.254.169.254/latest/user-data", ["X-aws-ec2-metadata-token: TOKEN-1"]),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", []),  # IMDSv1: no token
    ("http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token", []),
    ("http://169.254.169.254/computeMetadata/v1/instance/attributes/kube-env", ["Metadata-Flavor: Google"]),
    ("http://169.254.169.254/metadata/identity/oauth2/token", []),
    ("http://169.254.170.2/v2/metadata", []),
])
def test_everything_else_of_the_metadata_endpoints_is_refused_unseen(
    metadata_pod: tuple[Responder, LockedPod], url: str, headers: list[str]
) -> None:
    responder, locked = metadata_pod
    before = list(responder.seen)
    status, error, _body = _get(locked, url, *headers)
    assert (status, error) == (403, "denied_ip")
    assert responder.seen == before
    path = url.split("/", 3)[3]
    wait_until(lambda: any(e.get("status") == 403 and e.get("path") == f"/{path}" and "reason=metadata" in
                           e.get("detail", "") for e in locked.logs()), 5, message="the refusal's log line")


def test_gce_azure_and_ecs_credentials_work(metadata_pod: tuple[Responder, LockedPod]) -> None:
    _responder, locked = metadata_pod
    assert _get(locked, "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
                "Metadata-Flavor: Google") == (200, None, b'{"access_token": "ya29"}')
    assert _get(locked, "http://169.254.169.254/metadata/identity/oauth2/token", "Metadata: true") == (
        200, None, b'{"access_token": "eyJ"}')
    assert _get(locked, "http://169.254.170.2/v2/credentials/task-1") == (200, None, b'{"RoleArn": "arn"}')


def test_refusals_are_counted(metadata_pod: tuple[Responder, LockedPod]) -> None:
    _responder, locked = metadata_pod
    _get(locked, "http://169.254.169.254/latest/user-data")
    metrics = locked.admin_get("/metrics").text
    assert any(line.startswith("egress_denied_total{") and 'reason="metadata"' in line and not line.endswith(" 0.0")
               for line in metrics.splitlines())
