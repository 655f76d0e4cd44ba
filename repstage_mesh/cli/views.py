"""Rich tables for the CLI. Each function takes the API's JSON and returns a renderable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _primary(value: Any) -> Text:
    return Text(str(value)) if value else Text("none (fail closed)", style="yellow")


def cluster_table(cluster: Mapping[str, Any]) -> Table:
    table = _table("Cluster", "FIELD", "VALUE")
    first = ["node_id", "leader", "term", "commit_index", "applied_index", "quorum", "peers"]
    shown_apart = {"config_drift"}  # drift_text
    keys = [k for k in first if k in cluster] + sorted(
        k for k in cluster if k not in first and k not in shown_apart
    )
    for key in keys:
        value = cluster[key]
        if isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value) or "-"
        table.add_row(key, str(value))
    return table


def drift_text(cluster: Mapping[str, Any]) -> Text:
    """The node's config drift: services whose spec in its config file is not the replicated
    one, and how to resolve it."""
    items = cluster.get("config_drift") or []
    if not items:
        return Text("config file: in step with the replicated services", style="green")
    text = Text(f"config drift on {cluster.get('node_id', 'this node')}: its config file differs "
                "from the replicated services (the file only seeds; the replicated spec is in force)\n",
                style="yellow")  # fmt: skip
    for item in items:
        if item.get("kind") == "missing":
            text.append(f"  {item['service']}: in the config file only\n")
        else:
            text.append(f"  {item['service']}: {', '.join(item.get('fields') or [])}\n")
    text.append("  show and apply the file's specs with `repstage-mesh apply FILE [--dry-run]`")
    return text


def _members(service: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{m['name']}*" if m.get("role") == "primary" else str(m["name"])
        for m in service.get("members", [])
    )


def services_table(
    services: Sequence[Mapping[str, Any]], applied_index: int | None = None
) -> Table:
    title = "Services" + (f" (applied index {applied_index})" if applied_index is not None else "")
    table = _table(title, "NAME", "PROTOCOL", "PRIMARY", "EPOCH", "MEMBERS", "PORTS")
    for s in services:
        ports = str(s.get("listen_port", ""))
        if s.get("read_port"):
            ports += f" (read {s['read_port']})"
        table.add_row(str(s["name"]), str(s.get("protocol", "")), _primary(s.get("primary")),
                      str(s.get("epoch", "")), _members(s), ports)  # fmt: skip
    table.caption = "no services defined" if not services else "* marks the primary"
    return table


def service_detail(service: Mapping[str, Any]) -> RenderableType:
    head = _table(f"Service {service['name']}", "FIELD", "VALUE")
    head.add_row("protocol", str(service.get("protocol", "")))
    head.add_row("primary", _primary(service.get("primary")))
    head.add_row("epoch", str(service.get("epoch", "")))
    head.add_row("listen_port", str(service.get("listen_port", "")))
    head.add_row("read_port", str(service.get("read_port") or "-"))
    head.add_row("changed_at", str(service.get("changed_at", "")))
    head.add_row("applied_index", str(service.get("applied_index", "")))
    members = _table("Members", "NAME", "ADDRESS", "PORT", "ROLE")
    for m in service.get("members", []):
        role = Text(
            str(m.get("role", "")), style="bold green" if m.get("role") == "primary" else ""
        )
        members.add_row(str(m["name"]), str(m.get("address", "")), str(m.get("port", "")), role)
    return Group(head, members)


def _versions(types: Mapping[str, Any], key: str) -> str:
    return ", ".join(f"{name} {t[key]}" for name, t in sorted(types.items()) if t.get(key)) or "-"


def proxies_table(proxies: Sequence[Mapping[str, Any]]) -> Table:
    """One row per proxy stream: per xDS type the version sent, ACKed and NACKed, and whether
    it is behind what this node would send it now (its applied, committed state)."""
    table = _table(
        "Proxies", "NODE ID", "CLUSTER", "STREAM", "CONTROL PLANE", "STATE", "SENT", "ACKED", "NACKED"
    )
    for p in proxies:
        types = p.get("types") or {}
        behind = [name for name, t in sorted(types.items()) if (t or {}).get("behind")]
        state = (
            "disconnected"
            if p.get("connected") is False
            else ("synced" if p.get("synced") else "behind")
        )
        if any((t or {}).get("nacked_version") for t in types.values()):
            state = "nacked"
        style = {"synced": "green", "nacked": "red", "behind": "yellow"}.get(state, "")
        label = f"{state} ({', '.join(behind)})" if behind and state in ("behind", "nacked") else state
        nacked = "; ".join(
            f"{name} {t['nacked_version']}: {t.get('error') or ''}".rstrip(": ")
            for name, t in sorted(types.items())
            if t.get("nacked_version")
        )
        table.add_row(str(p.get("node_id", "")), str(p.get("cluster", "")), str(p.get("stream_kind") or ""),
                      str(p.get("control_plane") or ""), Text(label, style=style),
                      _versions(types, "sent_version"), _versions(types, "acked_version"),
                      nacked or "-")  # fmt: skip
    if not proxies:
        table.caption = "no proxies connected"
    return table


def _ms(value: Any) -> str:
    return f"{float(value):.1f}" if isinstance(value, int | float) else "-"


def failovers_table(records: Sequence[Mapping[str, Any]]) -> Table:
    """Failover records (GET /v1/failovers), newest last: who moved where, at which epoch, how
    long writes were unavailable, and the proxies that did not follow."""
    table = _table("Failovers", "ID", "SERVICE", "KIND", "MODE", "OLD -> NEW", "EPOCH", "STATUS",
                   "DURATION MS", "WRITES UNAVAILABLE MS", "NOT FOLLOWED", "CAUSE / REASON")  # fmt: skip
    for r in records:
        status = str(r.get("status", ""))
        style = {"done": "green", "failed": "red", "running": "yellow"}.get(status, "")
        missed = sorted({*r.get("missed_fence", []), *r.get("missed_route", [])})
        why = str(r.get("cause", ""))
        if r.get("reason") and status in ("failed", "running"):  # running: a repoint's last error
            why += f" / {r['reason']}"
        kind = str(r.get("kind", "")) + (f" x{r['attempts']}" if int(r.get("attempts") or 0) > 1 else "")
        table.add_row(str(r.get("id", "")), str(r.get("service", "")), kind,
                      str(r.get("mode", "")), f"{r.get('old_primary') or '-'} -> {r.get('new_primary') or '-'}",
                      str(r.get("epoch") if r.get("epoch") is not None else "-"), Text(status, style=style),
                      _ms(r.get("duration_ms")), _ms(r.get("write_unavailable_ms")),
                      ", ".join(missed) or "-", why)  # fmt: skip
    if not records:
        table.caption = "no failovers recorded"
    return table


def generic_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """A table of arbitrary JSON objects: one column per key seen."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = _table(title, *(c.upper() for c in columns))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    if not rows:
        table.caption = "none"
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def switchover_text(result: Mapping[str, Any]) -> Text:
    service = result.get("service", "")
    if not result.get("changed"):
        return Text(
            f"{service}: primary is already {result.get('primary')} (epoch {result.get('epoch')}); nothing changed"
        )
    previous = result.get("previous_primary") or "none"
    new = result.get("primary") or "none (fail closed)"
    return Text.assemble(
        (f"{service}: ", "bold"),
        f"primary {previous} → ",
        (str(new), "bold green"),
        f" at epoch {result.get('epoch')}",
    )


__all__ = [
    "cluster_table",
    "failovers_table",
    "generic_table",
    "proxies_table",
    "service_detail",
    "services_table",
    "switchover_text",
]
