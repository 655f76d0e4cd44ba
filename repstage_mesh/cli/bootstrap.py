"""`repstage-mesh bootstrap`: print the Envoy bootstrap that points an Envoy at the control plane."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError
from repstage_mesh.filters.bootstrap import build_bootstrap
from repstage_mesh.filters.xds_tls import XdsTls


def bootstrap_yaml(
    node_id: str, xds: list[str], admin_port: int, delta: bool, node_cluster: str,
    tls: XdsTls | None = None,
) -> str:
    addresses = [parse_host_port(x) for x in xds]
    doc = build_bootstrap(node_id, addresses, admin_port, delta=delta, node_cluster=node_cluster, tls=tls)
    return yaml.safe_dump(doc, sort_keys=False)


def xds_tls(args: Any) -> XdsTls | None:
    """--xds-tls-cert/--xds-tls-key/--xds-tls-ca: all three or none."""
    files = {
        "--xds-tls-cert": getattr(args, "xds_tls_cert", None),
        "--xds-tls-key": getattr(args, "xds_tls_key", None),
        "--xds-tls-ca": getattr(args, "xds_tls_ca", None),
    }
    given = [flag for flag, value in files.items() if value]
    server_name = getattr(args, "xds_tls_server_name", None) or ""
    if not given:
        if server_name:
            raise ValueError("--xds-tls-server-name needs --xds-tls-cert, --xds-tls-key and --xds-tls-ca")
        return None
    missing = [flag for flag in files if flag not in given]
    if missing:
        raise ValueError(f"mTLS to the control plane needs {', '.join(missing)} as well")
    cert, key, ca = files.values()
    return XdsTls(str(cert), str(key), str(ca), server_name)


def main(args: Any) -> int:
    try:
        text = bootstrap_yaml(
            args.node_id, list(args.xds), int(args.admin_port), bool(args.delta),
            getattr(args, "node_cluster", None) or "repstage", xds_tls(args),
        )
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = getattr(args, "out", None)
    if out and out != "-":
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0
