"""Files a config names: `check-config` and `run` refuse the same bad file the same way.

Each case is a config that loads as data but names a file start-up cannot use. Both
subcommands run as real subprocesses; each must exit 2 with one line on stderr naming the
key and the path, and no traceback anywhere.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization

from tests.conftest import ROOT, base_config

Case = Callable[[Path, trustme.CA], tuple[dict[str, Any], str, str]]  # -> (config overrides, key, path)


def _route(**extra: Any) -> dict[str, Any]:
    return {"name": "api", "prefix": "/api", "upstream": "https://localhost:1", **extra}


def _cert_and_key(tmp: Path, ca: trustme.CA) -> tuple[str, str]:
    leaf = ca.issue_cert("client.test")
    cert, key = tmp / "client.crt", tmp / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def _junk(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_text("not a PEM file\n")
    return str(path)


def missing_global_ca(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    path = str(tmp / "missing-ca.pem")
    return {"tls": {"ca_file": path}}, "$.tls.ca_file", path


def missing_route_ca(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    path = str(tmp / "missing-route-ca.pem")
    return {"routes": [_route(tls={"ca_file": path})]}, "$.routes[0].tls.ca_file", path


def ca_without_certificate(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    path = _junk(tmp, "empty-ca.pem")
    return {"routes": [_route(tls={"ca_file": path})]}, "$.routes[0].tls.ca_file", path


def ca_directory(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    return {"tls": {"ca_file": str(tmp)}}, "$.tls.ca_file", str(tmp)


def cert_without_key(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    cert, _ = _cert_and_key(tmp, ca)
    return {"routes": [_route(tls={"cert_file": cert})]}, "$.routes[0].tls.cert_file", cert


def key_of_another_certificate(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    cert, _ = _cert_and_key(tmp, ca)
    other = tmp / "other.key"
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(other))
    return ({"routes": [_route(tls={"cert_file": cert, "key_file": str(other)})]},
            "$.routes[0].tls.key_file", str(other))


def missing_key(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    cert, _ = _cert_and_key(tmp, ca)
    path = str(tmp / "missing.key")
    return {"routes": [_route(tls={"cert_file": cert, "key_file": path})]}, "$.routes[0].tls.key_file", path


def key_not_pem(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    cert, _ = _cert_and_key(tmp, ca)
    path = _junk(tmp, "junk.key")
    return {"routes": [_route(tls={"cert_file": cert, "key_file": path})]}, "$.routes[0].tls.key_file", path


def cert_not_pem(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    _, key = _cert_and_key(tmp, ca)
    path = _junk(tmp, "junk.crt")
    return {"routes": [_route(tls={"cert_file": path, "key_file": key})]}, "$.routes[0].tls.cert_file", path


def encrypted_key(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    cert, key = _cert_and_key(tmp, ca)
    loaded = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    locked = tmp / "locked.key"
    locked.write_bytes(loaded.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    return ({"routes": [_route(tls={"cert_file": cert, "key_file": str(locked)})]},
            "$.routes[0].tls.key_file", str(locked))


def missing_secret(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    path = str(tmp / "missing-token")
    return ({"routes": [_route(headers={"Authorization": {"file": path}})]},
            "$.routes[0].headers.Authorization.file", path)


def empty_secret(tmp: Path, ca: trustme.CA) -> tuple[dict[str, Any], str, str]:
    path = tmp / "empty-token"
    path.write_text("\n")
    return ({"routes": [_route(headers={"Authorization": {"file": str(path), "template": "Bearer {}"}})]},
            "$.routes[0].headers.Authorization.file", str(path))


CASES: list[Case] = [
    missing_global_ca, missing_route_ca, ca_without_certificate, ca_directory, cert_without_key,
    key_of_another_certificate, missing_key, key_not_pem, cert_not_pem, encrypted_key, missing_secret,
    empty_secret,
]


def _command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # stdin closed: OpenSSL must never wait for a pass phrase.
    return subprocess.run([sys.executable, "-m", "sidecar", *argv], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_check_config_and_run_refuse_the_file_in_one_line_naming_key_and_path(
    case: Case, ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    overrides, key, path = case(tmp_path, ca)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(ca_file, **overrides)))
    for argv in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = _command(argv)
        shown = f"{argv[0]}: exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        assert result.returncode == 2, shown
        assert "Traceback" not in result.stdout + result.stderr, shown
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, shown
        assert key in lines[0] and path in lines[0], shown


def test_a_good_client_certificate_and_secret_pass_check_config(
    ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    cert, key = _cert_and_key(tmp_path, ca)
    both = tmp_path / "both.pem"
    both.write_text(Path(key).read_text() + Path(cert).read_text())
    token = tmp_path / "token"
    token.write_text("abc\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(ca_file, routes=[
        _route(tls={"ca_file": ca_file, "cert_file": cert, "key_file": key},
               headers={"Authorization": {"file": str(token)}}),
        {"name": "combined", "prefix": "/combined", "upstream": "https://localhost:1",
         "tls": {"cert_file": str(both)}},  # key and certificate in one file
    ])))
    result = _command(["check-config", str(config)])
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, f"{config}: ok", "")


def test_yaml_error_names_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listen:\n  port: 15001\nroutes: [\n  {name: a\n")
    for argv in (["check-config", str(config)], ["run", "--config", str(config)]):
        result = _command(argv)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(config) in lines[0] and "line 5" in lines[0], result.stderr
        assert "<unicode string>" not in result.stderr and "Traceback" not in result.stderr


def test_pool_max_connections_alone_through_the_environment(tmp_path: Path) -> None:
    default = tmp_path / "default.yaml"
    default.write_text(_command(["print-default-config"]).stdout)
    env_run = subprocess.run(
        [sys.executable, "-c", "from sidecar.preflight import load_checked; import sys; "
         "c = load_checked(sys.argv[1]).pool; print(c.max_connections, c.max_keepalive_connections)", str(default)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={"EGRESS_POOL_MAX_CONNECTIONS": "10", "PATH": "/usr/bin:/bin"},
    )
    assert env_run.stdout.split() == ["10", "10"], env_run.stderr
