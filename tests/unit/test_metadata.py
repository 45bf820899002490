"""policy.metadata: identity (pure): the credential exchanges pass, everything else of those endpoints not."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.config import from_mapping
from sidecar.policy.egress import EgressPolicy, PolicyDenied
from sidecar.policy.metadata import identity_refusal
from sidecar.proxy.routing import Target

IMDS = "169.254.169.254"
TOKEN = [(b"x-aws-ec2-metadata-token", b"AQAE...")]


@pytest.mark.parametrize(("host", "method", "path", "headers"), [
    (IMDS, "PUT", "/latest/api/token", [(b"x-aws-ec2-metadata-token-ttl-seconds", b"21600")]),
    (IMDS, "GET", "/latest/meta-data/iam/security-credentials/", TOKEN),
    (IMDS, "GET", "/latest/meta-data/iam/security-credentials/my-role", TOKEN),
    ("fd00:ec2::254", "GET", "/latest/meta-data/iam/info", TOKEN),
    ("169.254.170.2", "GET", "/v2/credentials/5f1e-4c1a", []),
    ("169.254.170.23", "GET", "/v1/credentials", [(b"authorization", b"token")]),
    (IMDS, "GET", "/computeMetadata/v1/instance/service-accounts/default/token", [(b"metadata-flavor", b"Google")]),
    ("metadata.google.internal", "GET", "/computeMetadata/v1/project/project-id", [(b"metadata-flavor", b"Google")]),
    (IMDS, "GET", "/metadata/identity/oauth2/token", [(b"metadata", b"true")]),
])
def test_credential_exchanges_pass(host: str, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
    assert identity_refusal(host, 80, method, path, headers) is None


@pytest.mark.parametrize(("host", "port", "method", "path", "headers", "why"), [
    (IMDS, 80, "GET", "/latest/user-data", TOKEN, "not a credential path"),
    (IMDS, 80, "GET", "/latest/meta-data/iam/security-credentials/", [], "IMDSv1"),
    (IMDS, 80, "PUT", "/latest/api/token", [], "without X-aws-ec2-metadata-token-ttl-seconds"),
    (IMDS, 80, "GET", "/latest/meta-data/iam/../../user-data", TOKEN, "dot segments"),
    (IMDS, 80, "GET", "/latest/meta-data/iam/%2e%2e/user-data", TOKEN, "escapes"),
    (IMDS, 443, "GET", "/latest/meta-data/iam/info", TOKEN, "port 80 only"),
    (IMDS, 80, "GET", "/computeMetadata/v1/instance/attributes/kube-env", [(b"metadata-flavor", b"Google")],
     "not a credential path"),
    (IMDS, 80, "GET", "/computeMetadata/v1/instance/service-accounts/default/token", [], "Metadata-Flavor"),
    (IMDS, 80, "GET", "/metadata/identity/oauth2/token", [(b"metadata", b"false")], "Metadata: true"),
    (IMDS, 80, "GET", "/metadata/instance", [(b"metadata", b"true")], "not a credential path"),
    ("169.254.170.2", 80, "GET", "/v2/metadata", [], "not a credential path"),
    ("169.254.170.23", 80, "GET", "/v1/credentials", [], "without Authorization"),
])
def test_everything_else_is_refused_with_a_reason(
    host: str, port: int, method: str, path: str, headers: list[tuple[bytes, bytes]], why: str
) -> None:
    refusal = identity_refusal(host, port, method, path, headers)
    assert refusal is not None and why in refusal


def _target(host: str, path: str = "/latest/meta-data/iam/info") -> Target:
    return Target(None, "http", host, 80, path, None, host.encode())


def test_identity_is_off_by_default_and_on_only_when_chosen() -> None:
    assert EgressPolicy.from_config(from_mapping({})).identity_hosts == frozenset()
    policy = EgressPolicy.from_config(from_mapping({"policy": {"metadata": "identity"}}))
    assert "169.254.169.254" in policy.identity_hosts
    policy.check_identity(_target(IMDS), "GET", "/latest/meta-data/iam/info", TOKEN)
    with pytest.raises(PolicyDenied) as info:
        policy.check_identity(_target(IMDS, "/latest/user-data"), "GET", "/latest/user-data", TOKEN)
    assert (info.value.kind, info.value.reason) == ("denied_ip", "metadata")
    assert "not a credential path" in info.value.detail


def test_connect_guard_dials_identity_hosts_only_on_port_80() -> None:
    policy = EgressPolicy.from_config(from_mapping({"policy": {"metadata": "identity"}}))
    assert asyncio.run(policy.resolve(IMDS, 80)) == [IMDS]
    with pytest.raises(PolicyDenied):
        asyncio.run(policy.resolve(IMDS, 443))
    with pytest.raises(PolicyDenied):
        asyncio.run(EgressPolicy.from_config(from_mapping({})).resolve(IMDS, 80))
