"""`repstage-mesh bootstrap --xds-tls-*`: the xds_cluster's mTLS transport socket."""

from __future__ import annotations

import argparse

import pytest
import yaml

from repstage_mesh.cli.bootstrap import bootstrap_yaml, xds_tls
from repstage_mesh.filters.xds_tls import XdsTls


def _args(**kw: str | None) -> argparse.Namespace:
    base: dict[str, str | None] = {
        "xds_tls_cert": None, "xds_tls_key": None, "xds_tls_ca": None, "xds_tls_server_name": None,
    }
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_xds_cluster_gets_an_upstream_tls_context() -> None:
    tls = XdsTls("/etc/envoy/edge.crt", "/etc/envoy/edge.key", "/etc/envoy/cp-ca.crt", "cp.example")
    doc = yaml.safe_load(bootstrap_yaml("edge-1", ["10.0.0.1:18000"], 9901, False, "repstage", tls=tls))
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    socket = cluster["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]
    assert context["@type"].endswith("UpstreamTlsContext") and context["sni"] == "cp.example"
    common = context["common_tls_context"]
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": "/etc/envoy/edge.crt"}, "private_key": {"filename": "/etc/envoy/edge.key"}}
    ]
    assert common["validation_context"]["trusted_ca"] == {"filename": "/etc/envoy/cp-ca.crt"}
    assert common["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "cp.example"}
    assert common["alpn_protocols"] == ["h2"]


def test_without_tls_flags_there_is_no_transport_socket() -> None:
    doc = yaml.safe_load(bootstrap_yaml("edge-1", ["10.0.0.1:18000"], 9901, False, "repstage", tls=xds_tls(_args())))
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "xds_cluster"]
    assert "transport_socket" not in cluster


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"xds_tls_cert": "c"}, "--xds-tls-key, --xds-tls-ca"),
        ({"xds_tls_cert": "c", "xds_tls_key": "k"}, "--xds-tls-ca"),
        ({"xds_tls_server_name": "cp"}, "--xds-tls-server-name needs"),
    ],
)
def test_partial_tls_flags_say_what_is_missing(given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        xds_tls(_args(**given))
