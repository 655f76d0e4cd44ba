"""`repstage-mesh bootstrap`: print the Envoy bootstrap that points an Envoy at the control plane."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError
from repstage_mesh.filters.bootstrap import build_bootstrap


def bootstrap_yaml(node_id: str, xds: list[str], admin_port: int, delta: bool, node_cluster: str) -> str:
    addresses = [parse_host_port(x) for x in xds]
    doc = build_bootstrap(node_id, addresses, admin_port, delta=delta, node_cluster=node_cluster)
    return yaml.safe_dump(doc, sort_keys=False)


def main(args: Any) -> int:
    try:
        text = bootstrap_yaml(
            args.node_id, list(args.xds), int(args.admin_port), bool(args.delta),
            getattr(args, "node_cluster", None) or "repstage",
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
