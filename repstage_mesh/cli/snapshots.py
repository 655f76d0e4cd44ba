"""`repstage-mesh snapshot SERVICE` (with live progress), `snapshot verify SERVICE ID` (a restore
drill, with live progress), `snapshot S1 S2 --consistent` (several services at one consistent
point) and `snapshots SERVICE [ID]`."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from repstage_mesh.cli import views as render
from repstage_mesh.cli.client import ApiClient
from repstage_mesh.cli.output import EXIT_ERROR, EXIT_OK, CliError, Output, path_segment

__all__ = ["add_snapshot_commands", "cmd_snapshot", "cmd_snapshot_verify", "cmd_snapshots"]


def add_snapshot_commands(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    snap = sub.add_parser("snapshot", parents=common, help="take a snapshot of a service, with live progress; "
                          "`snapshot verify SERVICE ID`: a restore drill of one",
                          usage="%(prog)s SERVICE [options] | %(prog)s verify SERVICE ID [options]")
    snap.add_argument("service", metavar="SERVICE")
    snap.add_argument("more", metavar="SERVICE", nargs="*",
                      help="more services (with --consistent); verify: the SERVICE and the snapshot ID")
    snap.add_argument("--member", default="replica",
                      help="replica (default: the most caught-up one), primary, or a member's name")
    snap.add_argument("--consistent", action="store_true",
                      help="all the services at one consistent point (new writes held for at most "
                      "snapshots.consistent_hold_ms)")
    snap.add_argument("--no-wait", action="store_true", help="answer with the committed intent at once")
    snaps = sub.add_parser("snapshots", parents=common, help="a service's snapshots, or one with its steps")
    snaps.add_argument("service", metavar="SERVICE")
    snaps.add_argument("id", metavar="ID", nargs="?")


SNAPSHOT_POLL = 0.2  # seconds between progress reads


def cmd_snapshot(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """POST the snapshot, then follow its committed steps until it ended and its undo is done."""
    if args.service == "verify" and args.more and not getattr(args, "consistent", False):
        if len(args.more) != 2:
            raise CliError("usage: `snapshot verify SERVICE ID` (a restore drill of the snapshot ID of SERVICE)")
        return cmd_snapshot_verify(args, client, out)
    if args.more and not args.consistent:
        raise CliError("several services are snapshotted together only at one point: add --consistent "
                       "(`snapshot verify SERVICE ID` verifies one)")
    if args.consistent:
        return _consistent_point(args, client, out)
    base = f"/v1/services/{path_segment(args.service)}/snapshots"
    entry = client.post(base, {"member": args.member})
    if not args.no_wait:
        path = f"{base}/{path_segment(entry['id'])}"
        with contextlib.ExitStack() as stack:
            status = None if out.as_json else stack.enter_context(
                out.console.status(f"snapshot {entry['id']} of {args.service}/{entry['member']}...", spinner="dots"))
            while entry.get("status") == "running" or entry.get("undo") or entry.get("pool") != "in":
                time.sleep(SNAPSHOT_POLL)  # the CLI polls; the server has no change feed
                entry = client.get(path)
                steps = entry.get("steps") or []
                if status is not None and steps:
                    status.update(f"snapshot {entry['id']} of {args.service}/{entry['member']}: {steps[-1]['name']}")
    out.show(entry, f"{args.service}/{entry['member']} ({entry['role']}, epoch {entry['epoch']}): {entry['status']}"
             + (f": {entry['error']}" if entry.get("error") else ""), render.snapshot_steps(entry))
    return EXIT_OK if entry.get("status") in ("completed", "running") else EXIT_ERROR


def cmd_snapshots(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    base = f"/v1/services/{path_segment(args.service)}/snapshots"
    if args.id:
        entry = client.get(f"{base}/{path_segment(args.id)}")
        out.show(entry, render.snapshots_table([entry]), render.snapshot_steps(entry), verification_text(entry))
        return EXIT_OK
    listed = client.get(base)
    out.show(listed, render.snapshots_table(listed.get("snapshots", [])))
    return EXIT_OK


def verification_text(entry: dict[str, Any]) -> str:
    """One line for a snapshot's last drill."""
    v = entry.get("verification") or {}
    if not v:
        return f"snapshot {entry.get('id')}: never verified"
    counts = v.get("counts") or {}
    ledger = (f"ledger: {v.get('matched', 0)}/{v.get('expected', 0)} matched, " + ", ".join(
        f"{counts.get(k, 0)} {k}" for k in ("missing", "extra", "unexplained"))) if v.get("compared") \
        else "no ledger configured (restore only)"
    line = (f"snapshot {entry.get('id')} verify {v.get('drill')}: {v.get('status')} "
            f"(restored: {'yes' if v.get('restored') else 'no'}; {ledger}; {float(v.get('duration_s') or 0):.1f} s)")
    for name in ("missing", "extra", "unexplained"):
        if v.get(name):
            line += f"\n  {name}: {', '.join(v[name])}"
    return line + (f"\n  error: {v['error']}" if v.get("error") else "")


def cmd_snapshot_verify(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """POST the drill, then follow the snapshot's `verification` until it ended."""
    service, snapshot_id = args.more
    path = f"/v1/services/{path_segment(service)}/snapshots/{path_segment(snapshot_id)}"
    entry = client.post(f"{path}/verify", {})
    drill = (entry.get("verification") or {}).get("drill")
    if not args.no_wait:
        with contextlib.ExitStack() as stack:
            status = None if out.as_json else stack.enter_context(
                out.console.status(f"verifying snapshot {snapshot_id} of {service} (drill {drill})...", spinner="dots"))
            started = time.monotonic()
            while (v := entry.get("verification") or {}).get("drill") == drill and v.get("status") == "running":
                time.sleep(SNAPSHOT_POLL)  # the CLI polls; the server has no change feed
                entry = client.get(path)
                if status is not None:
                    status.update(f"verifying snapshot {snapshot_id} of {service}: restore and compare, "
                                  f"{time.monotonic() - started:.0f} s")
    out.show(entry, verification_text(entry))
    v = entry.get("verification") or {}
    return EXIT_OK if v.get("status") in ("ok", "running") and v.get("drill") == drill else EXIT_ERROR


def _point_done(client: ApiClient, point: dict[str, Any]) -> bool:
    if point.get("status") in ("intent", "holding"):
        return False
    for service, snapshot_id in (point.get("snapshots") or {}).items():
        entry = client.get(f"/v1/services/{path_segment(service)}/snapshots/{path_segment(snapshot_id)}")
        if entry.get("status") == "running":
            return False
    return True


def _consistent_point(args: argparse.Namespace, client: ApiClient, out: Output) -> int:
    """POST /v1/consistent-points, then follow it until every snapshot of it ended."""
    if args.member not in ("replica", "primary"):
        raise CliError("--member: replica or primary with --consistent (a point names no member)")
    services = [args.service, *args.more]
    point = client.post("/v1/consistent-points", {"services": services, "consistent": True, "member": args.member})
    path = f"/v1/consistent-points/{path_segment(point['id'])}"
    if not args.no_wait:
        with contextlib.ExitStack() as stack:
            status = None if out.as_json else stack.enter_context(
                out.console.status(f"consistent point {point['id']} of {', '.join(services)}...", spinner="dots"))
            while not _point_done(client, point):
                time.sleep(SNAPSHOT_POLL)  # the CLI polls; the server has no change feed
                point = client.get(path)
                if status is not None:
                    status.update(f"consistent point {point['id']}: {point['status']}")
    summary = f"{', '.join(services)}: {point['status']}, writes held {float(point.get('held_ms', 0)):.1f} ms"
    out.show(point, summary + (f": {point['error']}" if point.get("error") else ""), render.snapshot_steps(point))
    return EXIT_OK if point.get("status") in ("released", "intent", "holding") else EXIT_ERROR
