"""`repstage-mesh bootstrap`: print the Envoy bootstrap that points an Envoy at the control plane."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import yaml

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError
from repstage_mesh.filters.bootstrap import XdsConnection, build_bootstrap
from repstage_mesh.filters.xds_tls import XdsTls


def connection_of(keepalive_interval: float | None, keepalive_timeout: float | None) -> XdsConnection:
    """The xDS connection settings, with the keepalive given on the command line (seconds)."""
    defaults = XdsConnection()
    for flag, value in (("--keepalive-interval", keepalive_interval), ("--keepalive-timeout", keepalive_timeout)):
        if value is not None and not 0.001 <= value <= 3600:
            raise ValueError(f"{flag}: must be between 0.001 and 3600 seconds, got {value:g}")
    return XdsConnection(
        keepalive_interval=defaults.keepalive_interval if keepalive_interval is None else timedelta(seconds=keepalive_interval),
        keepalive_timeout=defaults.keepalive_timeout if keepalive_timeout is None else timedelta(seconds=keepalive_timeout),
    )


def bootstrap_yaml(
    node_id: str, xds: list[str], admin_port: int, delta: bool, node_cluster: str,
    connection: XdsConnection | None = None, tls: XdsTls | None = None,
) -> str:
    addresses = [parse_host_port(x) for x in xds]
    doc = build_bootstrap(
        node_id, addresses, admin_port, delta=delta, node_cluster=node_cluster, connection=connection or XdsConnection(),
        tls=tls,
    )
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
            getattr(args, "node_cluster", None) or "repstage",
            connection_of(getattr(args, "keepalive_interval", None), getattr(args, "keepalive_timeout", None)),
            xds_tls(args),
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
