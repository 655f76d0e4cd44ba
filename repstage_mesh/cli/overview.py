"""The cluster-wide read commands: `status` and `proxies`, and what they fetch (every node's
proxies through `GET /v1/proxies?scope=cluster`, the members' health through `/v1/members`),
falling back gracefully on a server that has neither."""

from __future__ import annotations

import argparse
from typing import Any

from repstage_mesh.cli import views as render
from repstage_mesh.cli.client import ApiClient, ApiRequestError
from repstage_mesh.cli.output import EXIT_OK, Output


def gather_proxies(client: ApiClient) -> tuple[list[Any], dict[str, Any] | None]:
    """Every node's proxies (scope=cluster) with the nodes' answers; an older server that only
    knows its own answers a list (then: its proxies, and None)."""
    try:
        answer = client.get("/v1/proxies?scope=cluster")
    except ApiRequestError as exc:
        if exc.status != 400:
            raise
        answer = client.get("/v1/proxies")
    if isinstance(answer, list):
        return answer, None
    return list(answer.get("proxies", [])), dict(answer)


def members_view(client: ApiClient) -> dict[str, Any] | None:
    try:
        return dict(client.get("/v1/members"))
    except ApiRequestError as exc:
        if exc.status in (404, 405):  # a server without /v1/members
            return None
        raise


def cmd_status(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    cluster = client.get("/v1/cluster")
    services = client.get("/v1/services")
    proxies, gathered = gather_proxies(client)
    members = members_view(client)
    nodes = (gathered or {}).get("nodes", [])
    data = {"api": client.base_url, "cluster": cluster, "nodes": nodes, "services": services["services"],
            "applied_index": services["applied_index"], "members": members, "proxies": proxies}  # fmt: skip
    out.show(
        data,
        render.cluster_table(cluster),
        render.nodes_table(cluster, gathered),
        render.drift_text(cluster),
        render.services_table(services["services"], services["applied_index"]),
        render.members_table(members),
        render.proxies_table(proxies, nodes),
    )
    return EXIT_OK


def cmd_proxies(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    proxies, gathered = gather_proxies(client)
    nodes = (gathered or {}).get("nodes", [])
    out.show(gathered if gathered is not None else proxies, render.proxies_table(proxies, nodes))
    return EXIT_OK
