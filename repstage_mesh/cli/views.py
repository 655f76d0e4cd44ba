"""Rich tables for the CLI. Each function takes the API's JSON and returns a renderable.

Tables never split a word: every column is `no_wrap` with an ellipsis, so a narrow terminal
(80 columns) shortens a cell to `abc…` instead of folding it into fragments. Times are shown
as ages ("12s ago") against `now` (Unix seconds, the CLI's clock); nothing prints a Python repr.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _table(title: str, *columns: str) -> Table:
    """Columns named with a leading `~` hold free text: when the table is too wide they give up
    width first, wrapping between words (a word too long for the cell ends in `…`). The other
    columns (names, ids, numbers) stay on one line and are only shortened, with `…`, as a last
    resort."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        text = column.startswith("~")
        table.add_column(column.lstrip("~"), no_wrap=not text, overflow="ellipsis")
    return table


def duration(seconds: Any) -> str:
    """12s, 4m05s, 3h12m, 2d4h ('-' for no number)."""
    if not isinstance(seconds, int | float):
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def age(unix: Any, now: float | None = None) -> str:
    """How long ago a Unix time was: '12s ago' ('-' for none)."""
    if not isinstance(unix, int | float) or unix <= 0:
        return "-"
    return f"{duration((time.time() if now is None else now) - unix)} ago"


def cell(value: Any) -> str:
    """Any JSON value as table text: no reprs, no 'None'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


def _primary(value: Any) -> Text:
    return Text(str(value)) if value else Text("none (fail closed)", style="yellow")


# --- cluster and nodes ----------------------------------------------------------------------------


def _peers(peers: Any) -> str:
    if not isinstance(peers, list):
        return cell(peers)
    return ", ".join(
        f"{p.get('node_id') or p.get('address')} ({'connected' if p.get('connected') else 'disconnected'})"
        if isinstance(p, Mapping) else cell(p)
        for p in peers
    ) or "none (single node)"  # fmt: skip


_SHOWN = ("node_id", "role", "leader", "term", "commit_index", "applied_index", "has_quorum", "peers", "uptime")
_HIDDEN = {"node", "nodes", "is_leader", "leader_address", "address", "started_at", "quorum", "state_index",
           "config_drift"}  # fmt: skip


def cluster_table(cluster: Mapping[str, Any], now: float | None = None) -> Table:
    """The answering node's Raft view: who leads (by node id), the term, indexes, quorum."""
    table = _table("Cluster (as " + str(cluster.get("node_id", "this node")) + " sees it)", "FIELD", "~VALUE")
    leader = cluster.get("leader")
    quorum = cluster.get("has_quorum") if cluster.get("has_quorum") is not None else cluster.get("quorum")
    values: dict[str, Any] = {
        "node_id": cluster.get("node_id"),
        "role": "leader" if cluster.get("is_leader") else "follower",
        "leader": Text(str(leader)) if leader else Text("none known (election?)", style="yellow"),
        "term": cluster.get("term"),
        "commit_index": cluster.get("commit_index"),
        "applied_index": cluster.get("applied_index"),
        "has_quorum": Text("yes", style="green") if quorum and leader else Text("no", style="red"),
        "peers": _peers(cluster.get("peers", [])),
        "uptime": duration(time.time() - cluster["started_at"] if now is None else now - cluster["started_at"])
        if isinstance(cluster.get("started_at"), int | float) else "-",
    }  # fmt: skip
    for key in _SHOWN:
        value = values[key]
        table.add_row(key, value if isinstance(value, Text) else cell(value))
    for key in sorted(k for k in cluster if k not in _SHOWN and k not in _HIDDEN):
        table.add_row(key, cell(cluster[key]))
    return table


def nodes_table(cluster: Mapping[str, Any], gathered: Mapping[str, Any] | None) -> Table:
    """Every control-plane node: Raft role and link as the answering node sees it, and whether it
    answered the cluster-wide gathering (with its proxy count)."""
    table = _table("Nodes", "NODE", "ROLE", "RAFT LINK", "~API", "~ANSWERED", "PROXIES")
    me = cluster.get("node_id")
    links = {p.get("node_id"): p.get("connected") for p in cluster.get("peers", []) if isinstance(p, Mapping)}
    for node in (gathered or {}).get("nodes", []):
        nid = node.get("node_id")
        role = "-" if not cluster.get("leader") else "leader" if nid == cluster.get("leader") else "follower"
        link = "self" if nid == me else ("connected" if links.get(nid) else "disconnected")
        answered = (
            Text("yes", style="green") if node.get("reachable")
            else Text(f"no: {node.get('error') or 'unreachable'}", style="red")
        )  # fmt: skip
        proxies = str(node.get("proxies", 0)) if node.get("reachable") else "?"
        table.add_row(str(nid), role, link, cell(node.get("api")), answered, proxies)
    if gathered is None:
        table.caption = "this server shows its own proxies only (no ?scope=cluster)"
    elif not gathered.get("nodes"):
        table.caption = "no nodes announced yet"
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


# --- services and members -------------------------------------------------------------------------


def _members(service: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{m['name']}*" if m.get("role") == "primary" else str(m["name"])
        for m in service.get("members", [])
    )


def services_table(
    services: Sequence[Mapping[str, Any]], applied_index: int | None = None
) -> Table:
    title = "Services" + (f" (applied index {applied_index})" if applied_index is not None else "")
    table = _table(title, "NAME", "PROTOCOL", "PRIMARY", "EPOCH", "~PORTS", "~MEMBERS")
    for s in services:
        ports = str(s.get("listen_port", ""))
        if s.get("read_port"):
            ports += f" (read {s['read_port']})"
        table.add_row(str(s["name"]), str(s.get("protocol", "")), _primary(s.get("primary")),
                      cell(s.get("epoch")), ports, _members(s))  # fmt: skip
    table.caption = "no services defined" if not services else "* marks the primary"
    return table


_HEALTH_STYLE = {"primary": "bold green", "replica": "green", "down": "red", "unknown": "yellow",
                 "unobserved": "dim"}  # fmt: skip


def members_table(members: Mapping[str, Any] | None, service: str | None = None) -> Table:
    """Like `patronictl list`: per member its role in the replicated state, its health as the
    leader's probes see it (and since when), replication offset and lag behind the primary."""
    rows = [m for m in (members or {}).get("members", []) if service is None or m.get("service") == service]
    table = _table("Members", "SERVICE", "MEMBER", "~HOST", "ROLE", "HEALTH", "SINCE", "OFFSET", "LAG")
    for m in rows:
        health = str(m.get("health", "unobserved"))
        role = Text(str(m.get("role", "")), style="bold" if m.get("role") == "primary" else "")
        mismatch = health in ("primary", "replica") and health != m.get("role")
        label = Text(health + (" (!)" if mismatch else ""), style="red" if mismatch else _HEALTH_STYLE.get(health, ""))
        table.add_row(str(m.get("service")), str(m.get("member")), f"{m.get('address')}:{m.get('port')}", role,
                      label, duration(m.get("since_seconds")), cell(m.get("offset")), cell(m.get("lag")))  # fmt: skip
    if members is None:
        table.caption = "health unknown: the server has no /v1/members"
    elif not members.get("leader"):
        table.caption = f"health unobserved: {members.get('node_id')} could not ask the Raft leader"
    else:
        table.caption = f"observed by the leader {members.get('node_id')}; LAG: bytes behind the primary"
    return table


def service_detail(service: Mapping[str, Any], members: Mapping[str, Any] | None = None) -> RenderableType:
    head = _table(f"Service {service['name']}", "FIELD", "~VALUE")
    head.add_row("protocol", str(service.get("protocol", "")))
    head.add_row("primary", _primary(service.get("primary")))
    head.add_row("epoch", cell(service.get("epoch")))
    head.add_row("listen_port", cell(service.get("listen_port")))
    head.add_row("read_port", cell(service.get("read_port")))
    head.add_row("changed at index", cell(service.get("changed_at")))
    head.add_row("applied_index", cell(service.get("applied_index")))
    if members is not None:
        return Group(head, members_table(members, str(service["name"])))
    table = _table("Members", "NAME", "~ADDRESS", "PORT", "ROLE")
    for m in service.get("members", []):
        role = Text(str(m.get("role", "")), style="bold green" if m.get("role") == "primary" else "")
        table.add_row(str(m["name"]), cell(m.get("address")), cell(m.get("port")), role)
    return Group(head, table)


# --- proxies --------------------------------------------------------------------------------------


def _index(version: Any) -> str:
    """The Raft index part of a version ('12-9f8e…' → '12'): the digest is for machines."""
    return str(version).split("-", 1)[0]


def _versions(types: Mapping[str, Any], key: str) -> str:
    """Per type the Raft index of `key` (sent/acked version); `all 12` when every type agrees."""
    found = {name: _index(t[key]) for name, t in sorted(types.items()) if (t or {}).get(key)}
    if found and len(set(found.values())) == 1 and len(found) == len(types):
        return f"all {next(iter(found.values()))}"
    return ", ".join(f"{name} {v}" for name, v in found.items()) or "-"


def proxy_state(p: Mapping[str, Any]) -> tuple[str, str]:
    """(label, style): disconnected (never synced), nacked (types), behind (types) or synced."""
    types = p.get("types") or {}
    if p.get("connected") is False:
        return "disconnected", "dim"
    if any((t or {}).get("nacked_version") and (t or {}).get("sync") != "synced" for t in types.values()):
        nacked = [n for n, t in sorted(types.items()) if (t or {}).get("nacked_version")]
        return f"nacked ({', '.join(nacked)})", "red"
    if p.get("synced"):
        return "synced", "green"
    behind = [name for name, t in sorted(types.items()) if (t or {}).get("behind")]
    return ("behind (" + ", ".join(behind) + ")") if behind else "behind", "yellow"


def proxies_table(proxies: Sequence[Mapping[str, Any]], nodes: Sequence[Mapping[str, Any]] = (),
                  now: float | None = None) -> Table:  # fmt: skip
    """One row per proxy stream, with the control-plane node serving it: its state, since when
    it is connected (or when it left), the Raft index it ACKed per type and the NACKs with
    Envoy's error (the full versions are in --json)."""
    table = _table("Proxies", "NODE", "PROXY", "STREAM", "~STATE", "SINCE", "~ACKED", "~NACKED")
    for p in sorted(proxies, key=lambda p: (str(p.get("control_plane")), str(p.get("node_id")))):
        types = p.get("types") or {}
        label, style = proxy_state(p)
        since = p.get("disconnected_at") if p.get("connected") is False else p.get("connected_at")
        nacked = "; ".join(
            f"{name} {_index(t['nacked_version'])}: {t.get('error') or ''}".rstrip(": ")
            for name, t in sorted(types.items()) if (t or {}).get("nacked_version")
        )  # fmt: skip
        table.add_row(cell(p.get("control_plane")), cell(p.get("node_id")), cell(p.get("stream_kind")),
                      Text(label, style=style), age(since, now), _versions(types, "acked_version"),
                      nacked or "-")  # fmt: skip
    missing = [n for n in nodes if not n.get("reachable")]
    notes = [f"{n.get('node_id')}: unreachable ({n.get('error') or 'no answer'}), its proxies unknown" for n in missing]
    if not proxies:
        notes.insert(0, "no proxies connected" + (" to any node" if nodes else ""))
    table.caption = "\n".join(notes) or None
    return table


# --- failovers ------------------------------------------------------------------------------------


def _ms(value: Any) -> str:
    return f"{float(value):.1f}" if isinstance(value, int | float) else "-"


_STATUS_STYLE = {"done": "green", "failed": "red", "running": "yellow"}


def failovers_table(records: Sequence[Mapping[str, Any]], now: float | None = None) -> Table:
    """Failover records (GET /v1/failovers): who moved where, at which epoch, how long writes
    were unavailable, the proxies that did not follow. `repstage-mesh failovers ID` shows one."""
    table = _table("Failovers", "ID", "SERVICE", "~KIND", "~OLD → NEW", "EPOCH", "STATUS", "STARTED",
                   "~WRITES OFF MS", "~MISSED", "~CAUSE")  # fmt: skip
    for r in records:
        status = str(r.get("status", ""))
        missed = sorted({*r.get("missed_fence", []), *r.get("missed_route", [])})
        why = str(r.get("cause", ""))
        if r.get("reason") and status in ("failed", "running"):  # running: a repoint's last error
            why += f" / {r['reason']}"
        kind = str(r.get("kind", "")) + (f" x{r['attempts']}" if int(r.get("attempts") or 0) > 1 else "")
        table.add_row(cell(r.get("id")), cell(r.get("service")), kind,
                      f"{r.get('old_primary') or '-'} → {r.get('new_primary') or '-'}", cell(r.get("epoch")),
                      Text(status, style=_STATUS_STYLE.get(status, "")), age(r.get("started_unix"), now),
                      _ms(r.get("write_unavailable_ms")), ", ".join(missed) or "-", why)  # fmt: skip
    if not records:
        table.caption = "no failovers recorded"
    return table


def failover_detail(record: Mapping[str, Any], now: float | None = None) -> RenderableType:
    """One failover: its summary, and its timeline (each step with its time since the start)."""
    head = _table(f"Failover {record.get('id')}", "FIELD", "~VALUE")
    status = str(record.get("status", ""))
    rows: list[tuple[str, Any]] = [
        ("service", record.get("service")), ("kind", f"{record.get('kind')} ({record.get('mode')})"),
        ("change", f"{record.get('old_primary') or '-'} → {record.get('new_primary') or '-'}"),
        ("status", Text(status + (f": {record['reason']}" if record.get("reason") else ""),
                        style=_STATUS_STYLE.get(status, ""))),
        ("cause", record.get("cause")), ("epoch", record.get("epoch")), ("fence epoch", record.get("fence_epoch")),
        ("started", age(record.get("started_unix"), now)), ("duration ms", _ms(record.get("duration_ms"))),
        ("writes unavailable ms", _ms(record.get("write_unavailable_ms"))),
        ("missed fence", record.get("missed_fence")), ("missed route", record.get("missed_route")),
        ("needs rejoin", record.get("needs_rejoin")),
    ]  # fmt: skip
    for name, value in rows:
        head.add_row(name, value if isinstance(value, Text) else cell(value))
    timeline = _table("Timeline", "+MS", "STEP", "~DETAIL")
    for event in record.get("timeline", []):
        timeline.add_row(_ms(event.get("elapsed_ms")), cell(event.get("name")), cell(event.get("detail") or None))
    if not record.get("timeline"):
        timeline.caption = "no steps yet"
    return Group(head, timeline)


def snapshots_table(snapshots: Sequence[Mapping[str, Any]]) -> Table:
    """Snapshots of a service (GET /v1/services/{name}/snapshots), newest first."""
    table = _table("Snapshots", "ID", "MEMBER", "ROLE", "EPOCH", "STATUS", "POOL", "LAST STEP", "ARTIFACT / ERROR")
    for s in snapshots:
        status = str(s.get("status", ""))
        style = {"completed": "green", "failed": "red", "aborted": "red", "running": "yellow"}.get(status, "")
        steps = s.get("steps") or []
        last = steps[-1]["name"] if steps else "-"
        drill = (s.get("verification") or {}).get("status")
        shown = f"{status} (verify: {drill})" if drill else status  # the last restore drill
        style = "red" if drill in ("failed", "interrupted") else style
        table.add_row(str(s.get("id", "")), str(s.get("member", "")), str(s.get("role", "")),
                      str(s.get("epoch", "")), Text(shown, style=style), str(s.get("pool", "")), last,
                      str(s.get("error") or s.get("artifact") or "-"))  # fmt: skip
    if not snapshots:
        table.caption = "no snapshots"
    return table


def snapshot_steps(snapshot: Mapping[str, Any]) -> str:
    """One line per committed step: name, seconds since the intent, ok, detail."""
    steps = snapshot.get("steps") or []
    start = float(steps[0]["at"]) if steps else 0.0
    return "\n".join(
        f"{st['name']:<24} +{float(st['at']) - start:8.3f} s  {'ok ' if st.get('ok') else 'FAIL'}  {st.get('detail', '')}"
        for st in steps
    )


def generic_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """A table of arbitrary JSON objects: one column per key seen."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = _table(title, *("~" + c.upper() for c in columns))
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    if not rows:
        table.caption = "none"
    return table


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
    "age",
    "cell",
    "cluster_table",
    "drift_text",
    "duration",
    "failover_detail",
    "failovers_table",
    "generic_table",
    "members_table",
    "nodes_table",
    "proxies_table",
    "proxy_state",
    "service_detail",
    "services_table",
    "switchover_text",
]
