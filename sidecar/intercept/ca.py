"""The per-pod interception CA: a name-constrained CA key in memory, and leaf contexts per SNI.

Imported only when `intercept.hosts` (or a route's `match_hosts`) is set: `cryptography` costs
~15 ms and ~4 MiB of imports that a sidecar without interception never pays.

What makes a copied CA certificate (the app containers can read it) worth nothing elsewhere:
- the key is generated at start (ECDSA P-256) and never leaves this process's memory: no file,
  no log line, not in `/config`. Leaf keys neither: OpenSSL loads a leaf from an anonymous
  in-memory file (memfd), since `ssl.SSLContext` reads certificates only from paths;
- X.509 name constraints (RFC 5280 4.2.1.10, critical) permit only the intercepted names: an
  exact `api.example.com` permits that DNS subtree, `*.example.com` the `example.com` subtree
  (RFC 5280 has no "subdomains only" form every verifier reads alike; the apex is the one
  name more). Every IP address is excluded, so the CA cannot sign for an address either;
- its validity is short (`intercept.ca_validity`) and ends with the pod's sidecar.

Written to `intercept.ca_dir`: `ca.crt` (the CA alone, for trust stores such as the JVM's) and
`bundle.pem` (the sidecar's own trust for destinations no route names, certifi's Mozilla set
or `tls.ca_file`, then the CA): the app containers' SSL_CERT_FILE, so names that stay tunnels
verify exactly as before.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.crt"
BUNDLE_FILE = "bundle.pem"
LEAF_LIFETIME = 24 * 3600.0  # seconds; cut to the CA's end
RENEW_BEFORE = 3600.0  # a cached leaf this close to its end is minted again
_SKEW = datetime.timedelta(minutes=5)  # not-before in the past: clocks in a cluster differ a little


def name_constraints(patterns: list[str]) -> x509.NameConstraints:
    """Permitted DNS subtrees for host patterns (exact names, `*.suffix`), every IP excluded."""
    permitted: dict[str, None] = {}
    for pattern in patterns:
        text = pattern.strip().lower()
        permitted[text[2:] if text.startswith("*.") else text] = None
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(name) for name in permitted],
        excluded_subtrees=[
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


@dataclass(frozen=True, slots=True)
class _Leaf:
    context: ssl.SSLContext
    renew_at: float  # time.time() after which the leaf is minted again


class InterceptCA:
    """The CA and its leaf cache. `context_for(sni)` is the only call on the data path."""

    def __init__(self, patterns: list[str], validity: float, cache_size: int, label: str = "") -> None:
        if not patterns:
            raise ValueError("an interception CA needs at least one host pattern")
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        # One leaf key for every leaf (as mitmproxy does): the leaves differ in name only, and
        # a key per leaf would double the minting cost for no gain (same process, same memory).
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-sidecar"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"egress-sidecar interception CA {label}".strip()[:64]),
        ])
        public = self._key.public_key()
        self.not_after = now + datetime.timedelta(seconds=validity)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(name_constraints(patterns), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
        self._issuer = name
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self._leaves: OrderedDict[str, _Leaf] = OrderedDict()
        self._cache_size = cache_size
        self.minted = 0

    def __repr__(self) -> str:  # never the key, whatever logs or prints this object
        return f"InterceptCA(subject={self.certificate.subject.rfc4514_string()!r})"

    def write(self, ca_dir: str, roots_pem: bytes) -> Path:
        """Write `ca.crt` and `bundle.pem` (roots, then the CA) into `ca_dir`; returns the bundle's path.

        Each file is written under a temporary name and renamed, so an app container that starts
        reading never sees half a bundle.
        """
        directory = Path(ca_dir)
        directory.mkdir(parents=True, exist_ok=True)
        roots = roots_pem if roots_pem.endswith(b"\n") or not roots_pem else roots_pem + b"\n"
        for name, content in ((CA_FILE, self.certificate_pem), (BUNDLE_FILE, roots + self.certificate_pem)):
            temporary = directory / f".{name}.tmp"
            temporary.write_bytes(content)
            temporary.chmod(0o644)  # app containers run as other users
            os.replace(temporary, directory / name)
        return directory / BUNDLE_FILE

    def context_for(self, host: str) -> ssl.SSLContext:
        """The server context presenting a leaf for `host` (canonical form); minted on first use."""
        leaf = self._leaves.get(host)
        if leaf is not None and time.time() < leaf.renew_at:
            self._leaves.move_to_end(host)
            return leaf.context
        leaf = self._mint(host)
        self._leaves[host] = leaf
        self._leaves.move_to_end(host)
        while len(self._leaves) > self._cache_size:
            self._leaves.popitem(last=False)
        return leaf.context

    def leaf_certificate(self, host: str, *, now: datetime.datetime | None = None) -> x509.Certificate:
        """A leaf certificate for `host`, signed by this CA (whatever the host; verifiers judge it)."""
        now = now or datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(seconds=LEAF_LIFETIME), self.not_after)
        # A common name holds at most 64 characters, and OpenSSL checks a host-like CN against the
        # name constraints too: a longer name gets an empty subject and a critical SAN (RFC 5280 4.2.1.6).
        fits = len(host) <= 64
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if fits else [])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._issuer)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=not fits)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def _mint(self, host: str) -> _Leaf:
        certificate = self.leaf_certificate(host)
        chain = certificate.public_bytes(serialization.Encoding.PEM) + self.certificate_pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        _load_from_memory(context, chain + self._leaf_key_pem)
        self.minted += 1
        renew_at = certificate.not_valid_after_utc.timestamp() - RENEW_BEFORE
        return _Leaf(context, max(renew_at, time.time() + 60))


def _load_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """`load_cert_chain` from an anonymous memory file: the key never touches a file system."""
    fd = os.memfd_create("egress-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def trust_roots(ca_file: str | None) -> bytes:
    """The PEM roots the bundle starts with: the sidecar's own default trust (`tls.ca_file`, else
    certifi, which httpx brings), so the app verifies non-intercepted names as the sidecar would."""
    if ca_file:
        return Path(ca_file).read_bytes()
    import certifi

    return Path(certifi.where()).read_bytes()
