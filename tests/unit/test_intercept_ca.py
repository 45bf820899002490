"""The per-pod interception CA: name constraints, leaves, what is written, what OpenSSL accepts.

Real OpenSSL throughout: the `openssl verify` CLI and Python's ssl module doing handshakes over
memory BIOs, against certificates this module made.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.intercept.ca import BUNDLE_FILE, CA_FILE, InterceptCA, name_constraints

PATTERNS = ["api.example.com", "*.stripe.com"]
ROOTS = b"-----BEGIN CERTIFICATE-----\nroots stand-in\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module")
def ca() -> InterceptCA:
    return InterceptCA(PATTERNS, validity=7 * 86400, cache_size=2, label="pod-a")


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_the_ca_carries_critical_name_constraints_for_exactly_the_intercepted_names(ca: InterceptCA) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.DNSName("api.example.com"), x509.DNSName("stripe.com")]
    assert constraints.value.excluded_subtrees == [
        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=7, minutes=5)


def test_duplicate_patterns_give_one_subtree() -> None:
    constraints = name_constraints(["*.a.test", "a.test", "b.test"])
    assert constraints.permitted_subtrees == [x509.DNSName("a.test"), x509.DNSName("b.test")]


def openssl_verify(tmp_path: Path, ca: InterceptCA, leaf: x509.Certificate) -> subprocess.CompletedProcess[str]:
    (tmp_path / "ca.pem").write_bytes(ca.certificate_pem)
    (tmp_path / "leaf.pem").write_bytes(pem(leaf))
    return subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=30, check=False)


LONG = "a" * 60 + ".b" * 10 + ".stripe.com"  # longer than a common name may be


@pytest.mark.parametrize("name", ["api.example.com", "charges.stripe.com", "a.b.stripe.com", LONG])
def test_openssl_accepts_a_leaf_for_an_intercepted_name(tmp_path: Path, ca: InterceptCA, name: str) -> None:
    done = openssl_verify(tmp_path, ca, ca.leaf_certificate(name))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["evil.org", "example.com", "www.example.com", "notstripe.com", "stripe.com.evil.org"])
def test_openssl_refuses_a_leaf_for_an_outside_name_signed_by_the_ca(
    tmp_path: Path, ca: InterceptCA, name: str
) -> None:
    done = openssl_verify(tmp_path, ca, ca.leaf_certificate(name))
    assert done.returncode != 0
    assert "permitted subtree violation" in done.stdout + done.stderr


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> tuple[str | None, object]:
    """A real TLS handshake between two contexts over memory BIOs: (ALPN chosen, peer subject CN)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if c.version() is not None and s.version() is not None:
            try:
                c.do_handshake()
                s.do_handshake()
            except ssl.SSLWantReadError:
                continue
            cert = c.getpeercert()
            subject = dict(x[0] for x in cert["subject"])  # type: ignore[arg-type,index]
            return c.selected_alpn_protocol(), subject.get("commonName")
    raise AssertionError("handshake did not finish")


def app_context(ca: InterceptCA) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.certificate_pem.decode())
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def test_python_ssl_trusts_a_minted_leaf_and_gets_http11(ca: InterceptCA) -> None:
    assert handshake(ca.context_for("charges.stripe.com"), app_context(ca), "charges.stripe.com") == (
        "http/1.1", "charges.stripe.com")
    assert handshake(ca.context_for(LONG), app_context(ca), LONG) == ("http/1.1", None)


def test_python_ssl_refuses_the_cas_leaf_for_an_outside_name(ca: InterceptCA, tmp_path: Path) -> None:
    # A server presenting a leaf the CA signed for evil.org, as a thief of the CA's key would.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.leaf_certificate("evil.org")
    forged = x509.CertificateBuilder(
        issuer_name=leaf.issuer, subject_name=leaf.subject, public_key=key.public_key(),
        serial_number=leaf.serial_number, not_valid_before=leaf.not_valid_before_utc,
        not_valid_after=leaf.not_valid_after_utc, extensions=leaf.extensions,
    ).sign(ca._key, leaf.signature_hash_algorithm)  # noqa: SLF001 - the thief's view: the CA key itself
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pem(forged) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server.load_cert_chain(chain)
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        handshake(server, app_context(ca), "evil.org")


def test_leaves_are_minted_once_kept_in_a_bounded_lru_and_renewed_before_they_end() -> None:
    ca = InterceptCA(["*.t.test"], validity=86400, cache_size=2)
    first = ca.context_for("a.t.test")
    assert ca.context_for("a.t.test") is first and ca.minted == 1
    ca.context_for("b.t.test")
    ca.context_for("a.t.test")  # a is now the most recently used
    ca.context_for("c.t.test")  # evicts b
    assert ca.minted == 3
    assert ca.context_for("a.t.test") is first
    ca.context_for("b.t.test")
    assert ca.minted == 4
    ca._leaves["a.t.test"] = replace(ca._leaves["a.t.test"], renew_at=time.time() - 1)  # noqa: SLF001
    assert ca.context_for("a.t.test") is not first and ca.minted == 5


def test_a_leaf_never_outlives_the_ca() -> None:
    ca = InterceptCA(["a.test"], validity=3600, cache_size=4)
    assert ca.leaf_certificate("a.test").not_valid_after_utc <= ca.certificate.not_valid_after_utc


def test_only_the_certificate_and_the_bundle_are_written(tmp_path: Path, ca: InterceptCA) -> None:
    bundle = ca.write(str(tmp_path / "ca"), ROOTS)
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [BUNDLE_FILE, CA_FILE]
    assert bundle.read_bytes() == ROOTS + ca.certificate_pem
    assert (tmp_path / "ca" / CA_FILE).read_bytes() == ca.certificate_pem
    assert (bundle.stat().st_mode & 0o777) == 0o644


def test_the_key_is_in_no_file_and_not_in_the_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build a CA, write its files, mint leaves; then no file under any directory the process could
    have written to (the test's tmp, /tmp, /dev/shm, the working directory) holds the key in any encoding."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    started = time.time() - 1
    ca = InterceptCA(["*.scan.test"], validity=3600, cache_size=8)
    ca.write(str(tmp_path / "ca"), ROOTS)
    for name in ("a.scan.test", "b.scan.test"):
        ca.context_for(name)
    key = ca._key  # noqa: SLF001
    encodings = [
        key.private_numbers().private_value.to_bytes(32, "big"),
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption()),
    ]
    assert "PRIVATE" not in repr(ca)
    scanned = 0
    for root in {tmp_path, Path("/tmp"), Path("/dev/shm"), Path.cwd()}:
        for directory, _, files in os.walk(root):
            for name in files:
                path = Path(directory) / name
                try:
                    if path.is_symlink() or not path.is_file() or path.stat().st_mtime < started:
                        continue
                    data = path.read_bytes()
                except OSError:
                    continue
                scanned += 1
                assert not any(encoding in data for encoding in encodings), path
    assert scanned >= 2  # at least the two files written
