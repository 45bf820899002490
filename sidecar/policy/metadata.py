"""`policy.metadata: identity`: the workload's own cloud credentials through the sidecar, nothing else.

With the egress lock the app can no longer reach the metadata endpoint directly, and cloud SDKs
fetch their credentials there. `identity` lets exactly the credential exchanges through (plain
HTTP on port 80, as the SDKs speak it); every other request to those endpoints (user-data,
instance attributes such as GKE's kube-env, any other path, a missing header) is refused as
`denied_ip` with reason `metadata`, like every metadata request under `deny`.

| provider | host | allowed |
|---|---|---|
| AWS IMDSv2 | 169.254.169.254, fd00:ec2::254 | `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`; `GET`/`HEAD` under `/latest/meta-data/iam/` with `X-aws-ec2-metadata-token` (IMDSv1, token-less, is refused) |
| ECS task role | 169.254.170.2 | `GET /v2/credentials/...` |
| EKS Pod Identity | 169.254.170.23, fd00:ec2::23 | `GET /v1/credentials` with `Authorization` |
| GCE / GKE | 169.254.169.254, metadata.google.internal | `GET` with `Metadata-Flavor: Google` of `/computeMetadata/v1/instance/service-accounts/...`, `/computeMetadata/v1/project/project-id` (and `numeric-project-id`), and `/` (the SDKs' presence check) |
| Azure IMDS | 169.254.169.254 | `GET /metadata/identity/oauth2/token` with `Metadata: true` |

Pure: a decision from (host, port, method, path, headers); forward.py calls it for requests to
these hosts instead of the address rules, and the connect guard (policy.py) then dials them.
"""

from __future__ import annotations

from collections.abc import Sequence

IDENTITY_PORT = 80
AWS_IMDS = frozenset({"169.254.169.254", "fd00:ec2::254"})
ECS = frozenset({"169.254.170.2"})
EKS_POD_IDENTITY = frozenset({"169.254.170.23", "fd00:ec2::23"})
GCE = frozenset({"169.254.169.254", "metadata.google.internal"})
AZURE = frozenset({"169.254.169.254"})
IDENTITY_HOSTS = AWS_IMDS | ECS | EKS_POD_IDENTITY | GCE | AZURE
# What metadata.google.internal may resolve to for the connect guard to dial it.
METADATA_ADDRESSES = frozenset({"169.254.169.254"})
# For the injected NO_PROXY when the lock is off (the app then goes direct, as SDKs expect).
NO_PROXY_ENTRIES = ("169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23",
                    "metadata.google.internal")

_GCE_PATHS = ("/computeMetadata/v1/instance/service-accounts/",)
_GCE_EXACT = frozenset({"/", "/computeMetadata/v1/project/project-id", "/computeMetadata/v1/project/numeric-project-id"})


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def identity_refusal(host: str, port: int, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """None when this is one of the credential exchanges above; else why it is refused.

    `host`: canonical (lower-case, IPv6 without brackets); `path`: without the query; `headers`:
    lower-case names, as the server hands them.
    """
    if port != IDENTITY_PORT:
        return f"metadata endpoints are served on port {IDENTITY_PORT} only"
    if ".." in path or "%" in path or "//" in path:
        return "metadata path with dot segments or escapes"  # no path games around the prefixes
    if host in AWS_IMDS:
        if method == "PUT" and path == "/latest/api/token":
            if _header(headers, b"x-aws-ec2-metadata-token-ttl-seconds") is not None:
                return None
            return "IMDSv2 token request without X-aws-ec2-metadata-token-ttl-seconds"
        if method in ("GET", "HEAD") and path.startswith("/latest/meta-data/iam/"):
            if _header(headers, b"x-aws-ec2-metadata-token") is not None:
                return None
            return "IMDSv1 (no X-aws-ec2-metadata-token): only IMDSv2 is allowed"
    if host in ECS and method == "GET" and path.startswith("/v2/credentials/"):
        return None
    if host in EKS_POD_IDENTITY and method == "GET" and path == "/v1/credentials":
        if _header(headers, b"authorization") is not None:
            return None
        return "EKS Pod Identity request without Authorization"
    if host in GCE and method == "GET" and (path in _GCE_EXACT or path.startswith(_GCE_PATHS)):
        flavor = _header(headers, b"metadata-flavor")
        if flavor is not None and flavor.lower() == b"google":
            return None
        return "GCE metadata request without Metadata-Flavor: Google"
    if host in AZURE and method == "GET" and path == "/metadata/identity/oauth2/token":
        if (_header(headers, b"metadata") or b"").lower() == b"true":
            return None
        return "Azure IMDS request without Metadata: true"
    return f"{method} {path[:100]} is not a credential path"
