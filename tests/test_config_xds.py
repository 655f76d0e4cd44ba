"""The `xds` section: TLS files, plaintext on loopback only, limits (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repstage_mesh.config import ConfigError, load_config
from repstage_mesh.node import xds_limits, xds_security
from repstage_mesh.xds.limits import XdsLimits
from tests.certs import CertAuthority


def write(tmp_path: Path, xds: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"node:\n  id: cp-1\n  data_dir: {tmp_path / 'd'}\nxds:\n{xds}")
    return path


def test_defaults_are_the_limits_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, "  listen: 127.0.0.1:18000\n"), env={})
    assert xds_limits(settings.xds) == XdsLimits()
    security = xds_security(settings.xds)
    assert security.tls is None and not security.insecure


@pytest.mark.parametrize("listen", ["0.0.0.0:18000", "[::]:18000", "127.0.0.2:18000", "[::1]:18000", "localhost:18000"])
def test_plaintext_listen_allowed(tmp_path: Path, listen: str) -> None:
    load_config(write(tmp_path, f"  listen: '{listen}'\n"), env={})


def test_plaintext_on_a_non_loopback_address_is_refused_unless_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "  listen: 10.1.2.3:18000\n"), env={})
    assert "xds.listen" in str(err.value) or "xds" in str(err.value)
    assert "xds.insecure" in str(err.value)
    settings = load_config(write(tmp_path, "  listen: 10.1.2.3:18000\n  insecure: true\n"), env={})
    assert xds_security(settings.xds).insecure


def pki(tmp_path: Path) -> None:
    ca = CertAuthority()
    ca.issue("cp", server=True).write(tmp_path, "s")
    (tmp_path / "ca.crt").write_bytes(ca.pem)


def test_tls_files_must_exist_and_the_san_pattern_must_name_the_node(tmp_path: Path) -> None:
    pki(tmp_path)
    tls = f"  listen: 10.1.2.3:18000\n  tls:\n    cert_file: {tmp_path / 's.crt'}\n    key_file: {tmp_path / 's.key'}\n"
    settings = load_config(write(tmp_path, tls + f"    ca_file: {tmp_path / 'ca.crt'}\n    node_san: 'dns:{{node_id}}.mesh'\n"), env={})
    security = xds_security(settings.xds)
    assert security.tls is not None and security.identity.expected("e1") == "e1.mesh"
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, tls + f"    ca_file: {tmp_path / 'missing.crt'}\n"), env={})
    assert "ca_file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, tls + f"    ca_file: {tmp_path / 'ca.crt'}\n    node_san: 'uri:spiffe://x/fixed'\n"), env={})
    assert "node_san" in str(err.value)


def test_a_limit_below_its_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "  limits:\n    max_streams_per_peer: 0\n"), env={})
    assert "xds.limits.max_streams_per_peer" in str(err.value)


def test_tls_files_that_serve_could_not_load_are_refused_by_validate(tmp_path: Path) -> None:
    pki(tmp_path)
    other = CertAuthority().issue("x", server=True)
    (tmp_path / "other.key").write_bytes(other.key)
    (tmp_path / "junk.crt").write_text("not a certificate")
    base = "  tls:\n    cert_file: {cert}\n    key_file: {key}\n    ca_file: {ca}\n"
    cases = {
        "key_file: is not the private key of cert_file": ("s.crt", "other.key", "ca.crt"),
        "cert_file: not a PEM": ("junk.crt", "s.key", "ca.crt"),
        "ca_file: not PEM": ("s.crt", "s.key", "junk.crt"),
    }
    for message, (cert, key, ca) in cases.items():
        text = base.format(cert=tmp_path / cert, key=tmp_path / key, ca=tmp_path / ca)
        with pytest.raises(ConfigError) as err:
            load_config(write(tmp_path, text), env={})
        assert message in str(err.value) and "xds.tls" in str(err.value), str(err.value)


def test_admission_fields_reach_the_limits_and_a_zero_rate_is_refused(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, "  limits:\n    admission_rate: 250.5\n    admission_burst: 40\n"), env={})
    limits = xds_limits(settings.xds)
    assert limits.admission_rate == 250.5 and limits.admission_burst == 40
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "  limits:\n    admission_rate: 0\n"), env={})
    assert "xds.limits.admission_rate" in str(err.value)
