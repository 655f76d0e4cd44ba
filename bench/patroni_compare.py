"""Patroni failover behind RepStage and behind HAProxy as Patroni's documentation configures it.

One real Patroni 4 cluster (etcd 3.4 + three PostgreSQL 15, integration/patroni.py: each member
its own loopback address, PostgreSQL and Patroni REST on the same ports on each), and three
ways to reach its primary, side by side on the same cluster and the same fault:

- HAProxy 2.6, the configuration of Patroni's documentation / docker example (HAPROXY_CFG):
  `option httpchk OPTIONS /primary`, `http-check expect status 200`,
  `default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions`, `check port <REST>`;
- RepStage `pg-probe`: one `serve` + one Envoy, an HTTP probe of Patroni's `/primary` every
  0.1 s (timeout 0.25 s, fall 3, rise 2), follow mode;
- RepStage `pg-announce`: Patroni's `on_role_change` callback runs `repstage-mesh announce`.

A writer per way INSERTs in a loop (autocommit, 1 s statement timeout, reconnect 2 ms after an
error) and records which member acknowledged each write (`inet_server_addr()`).

Faults:
- `kill`: SIGKILL of the leader's postmaster and backends (Patroni keeps running; with
  primary_start_timeout 0 it fails over at once instead of restarting PostgreSQL in place).
- `freeze`: SIGSTOP of the leader's Patroni only (its PostgreSQL keeps running and accepting
  writes: a hung agent). The leader key expires after ttl, a replica is promoted, then the old
  Patroni is resumed (SIGCONT) and demotes its PostgreSQL.

Measured per way: kill -> first write acknowledged by the new primary through it; writes
acknowledged by the old primary after the new one was promoted (its Patroni REST answered 200 on
/primary). Figures go to bench/RESULTS.md with --write-results (between markers).

    .venv/bin/python bench/patroni_compare.py --kills 5 --freezes 1 --write-results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import loadavg, machine, percentile, write_section  # noqa: E402
from integration.harness import ControlPlaneNode, Envoy, Proc, free_low_port, wait_until, workdir  # noqa: E402
from integration.patroni import (  # noqa: E402
    NAMES,
    PATRONI_DCS,
    PATRONI_VENV,
    PatroniCluster,
    host_of,
    missing,
    patroni_cluster,
)

MARKER = "patroni-compare"
OUT_JSON = ROOT / "bench" / "out" / "patroni_compare.json"
WAYS = ("HAProxy (Patroni docs)", "RepStage probe /primary", "RepStage on_role_change")
PROBE = {"kind": "http", "path": "/primary", "expect_status": 200, "interval": 0.1, "timeout": 0.25,
         "fall": 3, "rise": 2}  # fmt: skip


def haproxy_cfg(port: int, cluster: PatroniCluster) -> str:
    """Patroni's documented HAProxy configuration (docker/haproxy.cfg in Patroni's repository),
    with our addresses and ports."""
    servers = [f"    server {n} {host_of(n)}:{cluster.pg_port} maxconn 100 check port {cluster.rest_port}"
               for n in NAMES]  # fmt: skip
    return "\n".join([
        "global", "    maxconn 100", "",
        "defaults", "    log global", "    mode tcp", "    retries 2", "    timeout client 30m",
        "    timeout connect 4s", "    timeout server 30m", "    timeout check 5s", "",
        "listen primary", f"    bind 127.0.0.1:{port}", "    option httpchk OPTIONS /primary",
        "    http-check expect status 200",
        "    default-server inter 3s fall 3 rise 2 on-marked-down shutdown-sessions",
        *servers, "",
    ])  # fmt: skip


@dataclass
class Writer:
    """INSERTs through one port; (time, member) for every acknowledged write."""

    name: str
    port: int
    acks: list[tuple[float, str]] = field(default_factory=list)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def dsn(self) -> str:
        return (f"host=127.0.0.1 port={self.port} user=postgres password=postgres dbname=postgres "
                "connect_timeout=2 options='-c statement_timeout=1000'")  # fmt: skip

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        hosts = {host_of(n): n for n in NAMES}
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn(), autocommit=True)
                row = conn.execute("INSERT INTO w DEFAULT VALUES RETURNING host(inet_server_addr())").fetchone()
                assert row is not None
                self.acks.append((time.monotonic(), hosts.get(str(row[0]), str(row[0]))))
            except psycopg.Error:
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.002)  # pacing reconnects against a refused port
        if conn is not None:
            conn.close()

    def first_on(self, member: str, after: float) -> float | None:
        return next((t for t, m in self.acks if m == member and t > after), None)

    def count_on(self, member: str, after: float) -> int:
        return sum(1 for t, m in self.acks if m == member and t > after)


@contextmanager
def writers(ports: dict[str, int]) -> Iterator[dict[str, Writer]]:
    ws = {name: Writer(name, port) for name, port in ports.items()}
    threads = [threading.Thread(target=w.run, daemon=True) for w in ws.values()]
    for t in threads:
        t.start()
    try:
        yield ws
    finally:
        for w in ws.values():
            w.stop.set()
        for t in threads:
            t.join(10)


@dataclass
class Rig:
    cluster: PatroniCluster
    cp: ControlPlaneNode
    ports: dict[str, int]

    def primary(self, service: str) -> str | None:
        primary = self.cp.get(f"/v1/services/{service}")["primary"]
        return None if primary is None else str(primary)

    def routed_to(self, member: str, w: dict[str, Writer], since: float) -> bool:
        return all(x.first_on(member, since) is not None for x in w.values())


@contextmanager
def rig(haproxy: str) -> Iterator[Rig]:
    api_port = free_low_port()
    callback = [str(PATRONI_VENV / "bin" / "repstage-mesh"), "announce", "pg-announce", "{name}",
                "--api", f"http://127.0.0.1:{api_port}", "--retry-for", "10"]  # fmt: skip
    with ExitStack() as stack:
        wd = stack.enter_context(workdir())
        cluster = stack.enter_context(patroni_cluster(on_role_change=callback))
        leader = cluster.wait_healthy()
        with psycopg.connect(cluster.dsn(leader), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS w (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        ports = {WAYS[0]: free_low_port(), WAYS[1]: free_low_port(), WAYS[2]: free_low_port()}
        cfg_path = wd / "haproxy.cfg"
        cfg_path.write_text(haproxy_cfg(ports[WAYS[0]], cluster))
        hap = Proc([haproxy, "-db", "-f", str(cfg_path)], wd / "haproxy.log")
        hap.start()
        stack.callback(hap.stop, 5)
        members = cluster.members()
        services = [
            {"name": "pg-probe", "protocol": "postgres", "listen_port": ports[WAYS[1]], "members": members,
             "primary": leader, "leadership": {"source": "probe", "mode": "follow",
                                                "probe": {**PROBE, "port": cluster.rest_port}}},
            {"name": "pg-announce", "protocol": "postgres", "listen_port": ports[WAYS[2]], "members": members,
             "primary": leader, "leadership": {"source": "announce", "mode": "follow"}},
        ]  # fmt: skip
        cp = ControlPlaneNode(wd, {"api": {"listen": f"127.0.0.1:{api_port}"}, "services": services,
                                   "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)}})  # fmt: skip
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        cp.start()
        stack.callback(cp.stop)
        envoy.start()
        stack.callback(envoy.stop)
        yield Rig(cluster, cp, ports)


def settle(r: Rig) -> str:
    """A healthy cluster, and every way writing to its leader; returns the leader."""
    leader = r.cluster.wait_healthy(timeout=120)
    for service in ("pg-probe", "pg-announce"):
        if service == "pg-announce" and r.primary(service) != leader:
            print(f"  note: {service} is at {r.primary(service)}, Patroni's leader {leader}: re-announcing by hand")
            r.cp.call("POST", "/v1/services/pg-announce/primary", {"member": leader, "cause": "bench: resync"})

        def routed(s: str = service) -> bool:
            return r.primary(s) == leader

        wait_until(routed, 30, what=f"{service} routes to {leader}")
    return leader


def one_run(r: Rig, fault: str) -> dict[str, Any]:
    old = settle(r)
    with writers(r.ports) as w:
        start = time.monotonic()
        wait_until(lambda: r.routed_to(old, w, start), 30, what=f"every way writes to {old}")
        time.sleep(1.0)  # a second of steady writes before the fault
        patroni_pid = r.cluster.procs[old].pid
        if fault == "kill":
            t0 = r.cluster.kill_postgres(old)
        else:
            t0 = time.monotonic()
            r.cluster.procs[old].send_signal(signal.SIGSTOP)
        new = r.cluster.wait_leader(other_than=old, timeout=90)
        promoted = time.monotonic()
        resumed = None
        if fault == "freeze":
            time.sleep(1.0)  # the old primary keeps running a moment with a new leader elected
            resumed = time.monotonic()
            os.kill(patroni_pid, signal.SIGCONT)
        wait_until(lambda: r.routed_to(new, w, t0), 90, what=f"every way writes to {new}")
        time.sleep(0.5)
    out: dict[str, Any] = {"fault": fault, "old": old, "new": new, "promoted_ms": (promoted - t0) * 1000,
                           "resumed_ms": None if resumed is None else (resumed - t0) * 1000, "ways": {}}  # fmt: skip
    for way, x in w.items():
        first = x.first_on(new, t0)
        out["ways"][way] = {
            "first_write_ms": None if first is None else (first - t0) * 1000,
            "old_acked_after_promotion": x.count_on(old, promoted),
            "old_acked_after_fault": x.count_on(old, t0),
            "failed": x.failed,
        }
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is not installed (scripts/system-deps.sh --bench)"
    why = missing()
    assert why is None, why
    results: dict[str, Any] = {"meta": {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "load_before": loadavg(),
        "haproxy": " ".join(subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout.split()[:3]),
        "patroni": subprocess.run([str(PATRONI_VENV / "bin" / "patroni"), "--version"],
                                  capture_output=True, text=True).stdout.strip(),
    }, "runs": []}  # fmt: skip
    started = time.monotonic()
    with rig(haproxy) as r:
        results["meta"]["haproxy_cfg"] = haproxy_cfg(r.ports[WAYS[0]], r.cluster)
        for fault, n in (("kill", args.kills), ("freeze", args.freezes)):
            for i in range(n):
                res = one_run(r, fault)
                results["runs"].append(res)
                ways = "; ".join(f"{k}: {v['first_write_ms'] and round(v['first_write_ms'])} ms, "
                                 f"old after promotion {v['old_acked_after_promotion']}"
                                 for k, v in res["ways"].items())  # fmt: skip
                print(f"{fault} #{i + 1} {res['old']} -> {res['new']} (promoted {res['promoted_ms']:.0f} ms): {ways}",
                      flush=True)  # fmt: skip
    results["meta"]["duration_s"] = time.monotonic() - started
    results["meta"]["command"] = ".venv/bin/python bench/patroni_compare.py " + " ".join(
        a for a in sys.argv[1:] if a != "--write-results")
    results["meta"]["load_after"] = loadavg()
    return results


def render(results: dict[str, Any], command: str) -> str:
    meta = results["meta"]
    lines = [
        "## Patroni failover: RepStage (probe of /primary, on_role_change announce) vs HAProxy as Patroni documents it "
        "(bench/patroni_compare.py)", "",
        f"Command: `{command}` ({meta['date']}, {meta['machine']}, after {meta['load_after']}; {meta['patroni']}, etcd 3.4 (Debian etcd-server), PostgreSQL 15, "
        f"{meta['haproxy']}, Envoy 1.40 `--concurrency 1`; whole run {meta['duration_s']:.0f} s).", "",
        "Patroni settings (bootstrap.dcs): " + ", ".join(f"{k} {v}" for k, v in PATRONI_DCS.items() if k != "postgresql")
        + "; use_pg_rewind, wal_log_hints on, asynchronous replication, synchronous_commit off; three members on "
        "127.0.0.1/.2/.3, etcd3 API. RepStage: one `serve`, one Envoy; `pg-probe` probes "
        f"`GET /primary` on Patroni's REST port (interval {PROBE['interval']} s, timeout {PROBE['timeout']} s, "
        f"fall {PROBE['fall']}, rise {PROBE['rise']}, follow mode); `pg-announce` is set by Patroni's on_role_change "
        "callback `repstage-mesh announce pg-announce <member> --api ...`. One writer per way (INSERT, autocommit, "
        "reconnect 2 ms after an error).", "",
        "HAProxy configuration (Patroni's documented one, our addresses):", "", "```", meta["haproxy_cfg"].strip(), "```", "",
    ]  # fmt: skip
    for fault, title in (("kill", "kill -9 of the leader's postgres (Patroni keeps running)"),
                         ("freeze", "SIGSTOP of the leader's Patroni (its postgres keeps running), SIGCONT 1 s after the new leader")):  # fmt: skip
        runs = [x for x in results["runs"] if x["fault"] == fault]
        if not runs:
            continue
        promoted = [x["promoted_ms"] for x in runs]
        lines += [f"### {title}: {len(runs)} run(s)", "",
                  f"Patroni promoted a replica (its /primary answered 200) {percentile(promoted, 50):.0f} ms after the "
                  f"fault (p50; min {min(promoted):.0f}, max {max(promoted):.0f}).", "",
                  "| way | fault -> first write on the new primary, p50 (min / max) ms | writes acked by the old primary "
                  "after the new one was promoted (total) | after the fault (total) | failed writes (mean) |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for way in WAYS:
            firsts = [x["ways"][way]["first_write_ms"] for x in runs if x["ways"][way]["first_write_ms"] is not None]
            after_p = sum(x["ways"][way]["old_acked_after_promotion"] for x in runs)
            after_f = sum(x["ways"][way]["old_acked_after_fault"] for x in runs)
            failed = sum(x["ways"][way]["failed"] for x in runs) / len(runs)
            span = (f"{percentile(firsts, 50):.0f} ({min(firsts):.0f} / {max(firsts):.0f})" if firsts else "-")
            lines.append(f"| {way} | {span} | {after_p} | {after_f} | {failed:.0f} |")
        lines.append("")
    lines += ["### Reading", "", *READING]
    return "\n".join(lines)


READING = [
    "- **kill -9 of the leader's postgres.** Patroni notices on its next loop (loop_wait 1 s) and, with "
    "primary_start_timeout 0, releases the leader key; a replica is promoted ~2-3 s after the kill. RepStage's "
    "probe of /primary routes to it 0.3-0.4 s later (rise 2 at 0.1 s, then fence, commit, push, and the "
    "writer's reconnect); the "
    "callback way needs the `repstage-mesh announce` process to start (Python start-up) and is a little "
    "behind. HAProxy with the documented `inter 3s fall 3 rise 2` waits for the new leader to pass two checks "
    "3 s apart: 5-8 s more. None of the three can send a write to a dead postgres (the 2-3 'after the fault' "
    "are answers given just before the kill, timed after it).",
    "- **A hung Patroni** (SIGSTOP of the agent; its postgres keeps running as primary). Nothing is promoted "
    "before the leader key's ttl (20 s) expires. RepStage's probe times out on the frozen REST API and fails "
    "closed after fall x timeout (~1 s): a write outage until the promotion (the failed writes), and no write "
    "on the old primary after it. HAProxy keeps routing to the old primary until its checks have timed out "
    "(timeout check 5 s, fall 3; the old primary is still the only primary then: only what had not "
    "replicated at the promotion is lost, as in any asynchronous failover), then "
    "has no server until the new leader passes rise 2. The callback way alone has no detection: it keeps "
    "routing to the old primary until the new leader's on_role_change announces, so the old primary "
    "acknowledged writes after the promotion (the 3305 above, ~0.5 s of writes per run), which the old "
    "primary's pg_rewind then discards: lost acknowledged writes. Use (a) the probe, or (a) and (b) together, "
    "to fence a hung leader; the announce's own break-before-make is issue 14 item 1.",
    "- With 2 freeze runs the p50 is the faster run (nearest rank).",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=5, help="kill -9 runs")
    parser.add_argument("--freezes", type=int, default=1, help="SIGSTOP-Patroni runs (each ~30 s: ttl 20)")
    parser.add_argument("--write-results", action="store_true", help="replace this bench's section of RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help=f"render {OUT_JSON.name} again")
    args = parser.parse_args()
    command = ".venv/bin/python bench/patroni_compare.py " + " ".join(sys.argv[1:])
    if args.report_only:
        results = json.loads(OUT_JSON.read_text())
    else:
        results = run(args)
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(results, indent=2))
    results["meta"].setdefault("command", command)
    text = render(results, results["meta"]["command"])
    print()
    print(text)
    if args.write_results:
        write_section(MARKER, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
