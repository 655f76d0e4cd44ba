"""How fast does a real Envoy close an open tcp_proxy connection to a demoted primary?

Drives the real Envoy (``.venv/bin/envoy``, started as ``envoy -c bootstrap.yaml --base-id N``
with NO ``--drain-time-s``) through filesystem xDS (``path_config_source`` + ``watched_directory``,
files replaced by atomic rename), with in-process asyncio TCP backends that greet every
connection with ``HELLO <member>\\n`` and echo.

For each approach and each switch (old primary -> new primary):

* a client holds a connection opened through Envoy to the old primary;
* the new config is written (t0);
* we record when the held connection sees EOF (``closed``), and poll fresh connections every
  few ms until one lands on the new primary (``new_ok``); fresh connections that still land on
  the old primary after t0 are counted (``stale``);
* after the switch, 5 fresh connections must all land on the new primary (``correct``).

The ``bbm`` phase (break-before-make) switches primary -> none -> new primary and records when
the held connection closes, when fresh connections start being refused and when they reach the
new primary.

Usage::

    .venv/bin/python bench/close_on_switch.py                     # all approaches, 10 runs
    .venv/bin/python bench/close_on_switch.py active_hc_eds -n 20
    .venv/bin/python bench/close_on_switch.py --list

Prints a table; never passes/fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENVOY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "envoy"
MEMBERS = ("a", "b", "c")
HOLD_DEADLINE_S = 3.0  # how long we wait for the held connection to close
NEW_DEADLINE_S = 3.0  # how long we wait for a fresh connection to reach the new primary
HC_INTERVAL = "0.1s"  # overridden by --hc-interval
UNHEALTHY_THRESHOLD = 1  # overridden by --unhealthy-threshold (counts only network failures)
MERGE_WINDOW: str | None = "0s"  # overridden by --merge-window (None: Envoy's default, 1 s)

TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CLUSTER_T = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
CLA_T = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_T = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_T = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Rendering: state (primary or None, epoch) -> files {name: DiscoveryResponse dict}
# ---------------------------------------------------------------------------------------------


@dataclass
class Ports:
    listener: int
    hc: int
    hc2: int
    admin: int
    backends: dict[str, int]


@dataclass
class Ctx:
    dir: Path
    ports: Ports

    def source(self, name: str) -> dict[str, Any]:
        return {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": str(self.dir / name),
                "watched_directory": {"path": str(self.dir)},
            },
        }


def sock(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def tcp_listener(ctx: Ctx, cluster: str, name: str = "svc") -> dict[str, Any]:
    return {
        "@type": LISTENER_T,
        "name": name,
        "address": sock(ctx.ports.listener),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": TCP_PROXY,
                            "stat_prefix": name,
                            "cluster": cluster,
                        },
                    }
                ]
            }
        ],
    }


def hc_listener(ctx: Ctx, port: int | None = None, name: str = "primary-health") -> dict[str, Any]:
    """HTTP listener on the same Envoy answering the primary-cluster health checks (via RDS)."""
    return {
        "@type": LISTENER_T,
        "name": name,
        "address": sock(port or ctx.ports.hc),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM,
                            "stat_prefix": "primary_health",
                            "rds": {
                                "route_config_name": "primary-health",
                                "config_source": ctx.source("rds.json"),
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER},
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def hc_routes(healthy: set[str]) -> dict[str, Any]:
    """200 for members in ``healthy`` (matched on the Host header), 503 for everything else."""
    vhosts: list[dict[str, Any]] = [
        {
            "name": f"member-{m}",
            "domains": [f"{m}.primary-check"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
        }
        for m in sorted(healthy)
    ]
    vhosts.append(
        {
            "name": "not-primary",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 503}}],
        }
    )
    return {"@type": ROUTE_T, "name": "primary-health", "virtual_hosts": vhosts}


def cluster(
    ctx: Ctx,
    name: str = "svc",
    *,
    hc: bool = False,
    set_change: bool = False,
    health_failure: bool = True,
    epoch: int | None = None,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "@type": CLUSTER_T,
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": ctx.source(f"eds_{name}.json")},
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "close_connections_on_host_health_failure": health_failure,
        "ignore_health_on_host_removal": True,
    }
    if set_change:
        c["common_lb_config"]["close_connections_on_host_set_change"] = True
    if epoch is not None:
        c["metadata"] = {"filter_metadata": {"repstage": {"epoch": epoch}}}
    if hc:
        # Health-only host changes are batched for update_merge_window (default 1 s) before
        # the load balancers see them; 0 applies them at once.
        if MERGE_WINDOW is not None:
            c["common_lb_config"]["update_merge_window"] = MERGE_WINDOW
        c["health_checks"] = [
            {
                "timeout": "1s",
                "interval": HC_INTERVAL,
                "no_traffic_interval": HC_INTERVAL,
                "no_traffic_healthy_interval": HC_INTERVAL,
                "unhealthy_interval": HC_INTERVAL,
                "unhealthy_threshold": UNHEALTHY_THRESHOLD,
                "healthy_threshold": 1,
                "http_health_check": {"path": "/primary"},
            }
        ]
    return c


def endpoint(
    ctx: Ctx,
    member: str,
    *,
    status: str | None = None,
    hc: bool = False,
    hc_disabled: bool = False,
    hc_port: int | None = None,
) -> dict[str, Any]:
    ep: dict[str, Any] = {"address": sock(ctx.ports.backends[member]), "hostname": member}
    if hc:
        port = hc_port or ctx.ports.hc
        ep["health_check_config"] = {
            "address": sock(port),
            "port_value": port,
            "hostname": f"{member}.primary-check",
            "disable_active_health_check": hc_disabled,
        }
    lb: dict[str, Any] = {"endpoint": ep}
    if status is not None:
        lb["health_status"] = status
    return lb


def cla(name: str, lb_endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "@type": CLA_T,
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
    }


Files = dict[str, list[dict[str, Any]]]


@dataclass
class Approach:
    name: str
    doc: str
    render: Callable[[Ctx, str | None, int], Files]
    # order in which files are written on a switch (EDS before CDS/LDS so the references exist)
    order: tuple[str, ...] = ("rds.json", "eds_svc.json", "cds.json", "lds.json")


def r_host_set_change(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    eps = [endpoint(ctx, primary)] if primary else []
    return {
        "cds.json": [cluster(ctx, set_change=True)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc")],
    }


def r_eds_unhealthy(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    eps = [endpoint(ctx, m, status="HEALTHY" if m == primary else "UNHEALTHY") for m in MEMBERS]
    return {
        "cds.json": [cluster(ctx)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc")],
    }


def r_active_hc(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    """All members in the CLA, no EDS status: only the active health check decides."""
    eps = [endpoint(ctx, m, hc=True) for m in MEMBERS]
    return {
        "rds.json": [hc_routes({primary} if primary else set())],
        "cds.json": [cluster(ctx, hc=True)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc"), hc_listener(ctx)],
    }


def r_active_hc_eds(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    """All members; EDS status routes at once, the health check answer closes old connections."""
    eps = [
        endpoint(ctx, m, hc=True, status="HEALTHY" if m == primary else "UNHEALTHY")
        for m in MEMBERS
    ]
    return {
        "rds.json": [hc_routes({primary} if primary else set())],
        "cds.json": [cluster(ctx, hc=True)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc"), hc_listener(ctx)],
    }


class FastHc:
    """Like active_hc_eds, but members that have never been primary answer 200.

    A member that has ever been primary answers 503 whenever it is not the primary (so a
    demotion always fails its next health check, however quickly switches follow each other);
    a member that has never been primary answers 200: EDS UNHEALTHY already keeps it out of
    load balancing, and on its first promotion it is routable as soon as EDS says HEALTHY,
    without waiting for a health-check round.
    """

    def __init__(self) -> None:
        self.ever_primary: set[str] = set()

    def __call__(self, ctx: Ctx, primary: str | None, epoch: int) -> Files:
        if primary is not None:
            self.ever_primary.add(primary)
        passing = {m for m in MEMBERS if m == primary or m not in self.ever_primary}
        eps = [
            endpoint(ctx, m, hc=True, status="HEALTHY" if m == primary else "UNHEALTHY")
            for m in MEMBERS
        ]
        return {
            "rds.json": [hc_routes(passing)],
            "cds.json": [cluster(ctx, hc=True)],
            "eds_svc.json": [cla("svc", eps)],
            "lds.json": [tcp_listener(ctx, "svc"), hc_listener(ctx)],
        }


class RotateHc:
    """Like active_hc_eds, but a promotion moves the member's health-check port to the other of
    two fence ports. Envoy does not update a host in place when its health-check address
    changes: the promoted member becomes a new host, checked at once (not after an interval),
    so it is routable after one check round trip. The port stays put while the member is
    primary and after its demotion, so the demotion fails the check on the very host object
    that holds the connections.
    """

    def __init__(self) -> None:
        self.slot: dict[str, int] = dict.fromkeys(MEMBERS, 0)
        self.last: str | None = None

    def __call__(self, ctx: Ctx, primary: str | None, epoch: int) -> Files:
        if primary is not None and primary != self.last:
            self.slot[primary] ^= 1
        self.last = primary
        ports = (ctx.ports.hc, ctx.ports.hc2)
        eps = [
            endpoint(
                ctx,
                m,
                hc=True,
                hc_port=ports[self.slot[m]],
                status="HEALTHY" if m == primary else "UNHEALTHY",
            )
            for m in MEMBERS
        ]
        return {
            "rds.json": [hc_routes({primary} if primary else set())],
            "cds.json": [cluster(ctx, hc=True)],
            "eds_svc.json": [cla("svc", eps)],
            "lds.json": [
                tcp_listener(ctx, "svc"),
                hc_listener(ctx),
                hc_listener(ctx, ctx.ports.hc2, "primary-health-2"),
            ],
        }


def r_hc_toggle(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    """Primary: EDS HEALTHY with active HC disabled; others: EDS UNHEALTHY and HC on (always 503)."""
    eps = [
        endpoint(
            ctx,
            m,
            hc=True,
            hc_disabled=(m == primary),
            status="HEALTHY" if m == primary else "UNHEALTHY",
        )
        for m in MEMBERS
    ]
    return {
        "rds.json": [hc_routes(set())],
        "cds.json": [cluster(ctx, hc=True)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc"), hc_listener(ctx)],
    }


def r_cds_update(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    """Same cluster name, cluster re-created by CDS on every switch (epoch in metadata)."""
    eps = [endpoint(ctx, primary)] if primary else []
    return {
        "cds.json": [cluster(ctx, set_change=True, epoch=epoch)],
        "eds_svc.json": [cla("svc", eps)],
        "lds.json": [tcp_listener(ctx, "svc")],
    }


def r_listener_epoch(ctx: Ctx, primary: str | None, epoch: int) -> Files:
    """Epoch-named cluster; the listener is updated to point at it (drains the old listener)."""
    name = f"svc-e{epoch}"
    eps = [endpoint(ctx, primary)] if primary else []
    files: Files = {
        "cds.json": [cluster(ctx, name)],
        f"eds_{name}.json": [cla(name, eps)],
        "lds.json": [tcp_listener(ctx, name)],
    }
    return files


APPROACHES: dict[str, Approach] = {
    a.name: a
    for a in [
        Approach(
            "host_set_change",
            "CLA = {primary}, close_connections_on_host_set_change",
            r_host_set_change,
        ),
        Approach(
            "eds_unhealthy",
            "CLA = all, old primary EDS UNHEALTHY, close_on_host_health_failure",
            r_eds_unhealthy,
        ),
        Approach(
            "active_hc",
            "CLA = all, HTTP HC to own listener 200/503 (RDS), no EDS status",
            r_active_hc,
        ),
        Approach(
            "active_hc_eds", "CLA = all with EDS status + HTTP HC 200/503 (RDS)", r_active_hc_eds
        ),
        Approach(
            "active_hc_fast",
            "as active_hc_eds, but never-yet-primary members answer 200",
            FastHc(),
        ),
        Approach(
            "active_hc_rotate",
            "as active_hc_eds, promotion moves the member's HC port (new host object)",
            RotateHc(),
        ),
        Approach(
            "hc_toggle", "primary: HC disabled; others: EDS UNHEALTHY + HC always 503", r_hc_toggle
        ),
        Approach(
            "cds_update", "cluster re-created by CDS (same name) on every switch", r_cds_update
        ),
        Approach(
            "listener_epoch",
            "epoch-named cluster + listener update (default drain time)",
            r_listener_epoch,
            order=("eds_*", "cds.json", "lds.json"),
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Envoy + files
# ---------------------------------------------------------------------------------------------


class Envoy:
    def __init__(self, ctx: Ctx, approach: Approach, extra_args: list[str]) -> None:
        self.ctx = ctx
        self.approach = approach
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = 0
        self.log = ctx.dir.parent / "envoy.log"

    def write(self, primary: str | None, epoch: int) -> None:
        files = self.approach.render(self.ctx, primary, epoch)
        self.version += 1
        names = sorted(files)

        def rank(n: str) -> int:
            for i, pat in enumerate(self.approach.order):
                if n == pat or (pat.endswith("*") and n.startswith(pat[:-1])):
                    return i
            return len(self.approach.order)

        for n in sorted(names, key=rank):
            body = {"version_info": str(self.version), "resources": files[n]}
            tmp = self.ctx.dir.parent / f".{n}.tmp"
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.ctx.dir / n)

    def bootstrap(self) -> Path:
        boot = {
            "node": {"id": "close-on-switch", "cluster": "bench"},
            "admin": {"address": sock(self.ctx.ports.admin)},
            "dynamic_resources": {
                "cds_config": self.ctx.source("cds.json"),
                "lds_config": self.ctx.source("lds.json"),
            },
        }
        p = self.ctx.dir.parent / "bootstrap.yaml"
        p.write_text(json.dumps(boot))
        return p

    def start(self) -> None:
        base_id = str(random.randint(10_000, 60_000))
        cmd = [str(ENVOY), "-c", str(self.bootstrap()), "--base-id", base_id]
        for arg in self.extra_args:  # Envoy's TCLAP wants "--flag value", not "--flag=value"
            cmd += arg.split("=", 1) if arg.startswith("--") else [arg]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            [*cmd, "--log-path", str(self.log), "-l", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stat(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.ctx.ports.admin}/stats?filter={name}"
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())


# ---------------------------------------------------------------------------------------------
# Backends and clients
# ---------------------------------------------------------------------------------------------


async def start_backend(member: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HELLO {member}\n".encode())
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await writer.drain()
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def probe(port: int, timeout: float = 0.5) -> str:
    """Open a fresh connection through Envoy: member name, 'refused' or 'timeout'."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (ConnectionError, OSError):
        return "refused"
    except TimeoutError:
        return "timeout"
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (ConnectionError, OSError):
        line = b""
    except TimeoutError:
        return "timeout"
    finally:
        writer.close()
    text = line.decode().strip()
    return text.removeprefix("HELLO ") if text.startswith("HELLO ") else "refused"


class Held:
    """A client connection held open through Envoy; records when it sees EOF."""

    def __init__(self) -> None:
        self.member = ""
        self.closed_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, port: int) -> None:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        line = await asyncio.wait_for(reader.readline(), 2)
        self.member = line.decode().strip().removeprefix("HELLO ")
        self._task = asyncio.create_task(self._watch(reader))

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(4096):
                pass
        self.closed_at = time.monotonic()

    async def wait_closed(self, deadline: float) -> None:
        assert self._task is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(self._task), max(0.0, deadline - time.monotonic())
            )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()


async def wait_until(pred: Callable[[], Any], deadline_s: float, what: str) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await pred():
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    closed_s: float | None  # None: still open at the deadline
    new_ok_s: float | None  # first fresh connection on the new primary (None: never)
    stale: int  # fresh connections that reached the old primary after t0
    last_stale_s: float | None
    correct: bool  # 5 fresh connections after the switch all on the new primary
    refused_s: float | None = None  # bbm: first refused fresh connection


@dataclass
class Result:
    approach: str
    phase: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""


async def poll_until(
    port: int, want: str, t0: float, deadline: float
) -> tuple[float | None, int, float | None, float | None]:
    """Poll fresh connections until one answers ``want``.

    Returns (t_ok, stale, t_last_stale, t_refused), times relative to t0.
    """
    stale = 0
    last_stale: float | None = None
    first: str | None = None
    refused_at: float | None = None
    while time.monotonic() < deadline:
        got = await probe(port)
        now = time.monotonic()
        if first is None:
            first = got
        if got == want:
            return now - t0, stale, last_stale, refused_at
        if got == "refused" and refused_at is None:
            refused_at = now - t0
        elif got not in ("refused", "timeout"):
            stale += 1
            last_stale = now - t0
        await asyncio.sleep(0.005)
    return None, stale, last_stale, refused_at


async def switch_once(env: Envoy, port: int, old: str, new: str | None, epoch: int) -> Run:
    held = Held()
    await held.open(port)
    if held.member != old:
        held.close()
        raise RuntimeError(f"held connection landed on {held.member!r}, expected {old!r}")
    t0 = time.monotonic()
    env.write(new, epoch)
    want = new if new is not None else "refused"
    poller = asyncio.create_task(poll_until(port, want, t0, t0 + NEW_DEADLINE_S))
    await held.wait_closed(t0 + HOLD_DEADLINE_S)
    t_ok, stale, last_stale, refused = await poller
    closed = None if held.closed_at is None else held.closed_at - t0
    held.close()
    answers = [await probe(port) for _ in range(5)]
    return Run(closed, t_ok, stale, last_stale, all(a == want for a in answers), refused)


async def measure(
    approach: Approach, runs: int, bbm_runs: int, extra_args: list[str]
) -> list[Result]:
    servers = {m: await start_backend(m) for m in MEMBERS}
    tmp = Path(tempfile.mkdtemp(prefix="close-on-switch-"))
    xds = tmp / "xds"
    xds.mkdir()
    ports = Ports(
        listener=free_port(),
        hc=free_port(),
        hc2=free_port(),
        admin=free_port(),
        backends={m: s.sockets[0].getsockname()[1] for m, s in servers.items()},
    )
    env = Envoy(Ctx(xds, ports), approach, extra_args)
    main = Result(approach.name, "switch")
    bbm = Result(approach.name, "bbm")
    try:
        epoch = 1
        current = "a"
        env.write(current, epoch)
        env.start()

        async def ready() -> bool:
            return await probe(ports.listener) == current

        await wait_until(ready, 15, f"first connection to reach {current}")
        for i in range(runs):
            new = MEMBERS[(MEMBERS.index(current) + 1) % len(MEMBERS)]
            epoch += 1
            main.runs.append(await switch_once(env, ports.listener, current, new, epoch))
            current = new
            if main.runs[-1].new_ok_s is None:
                await wait_until(ready, 5, f"{current} to become reachable")
            print(f"  {approach.name} switch {i + 1}: {main.runs[-1]}", file=sys.stderr)
        for i in range(bbm_runs):
            new = MEMBERS[(MEMBERS.index(current) + 1) % len(MEMBERS)]
            epoch += 1
            r1 = await switch_once(env, ports.listener, current, None, epoch)  # break
            epoch += 1
            t0 = time.monotonic()
            env.write(new, epoch)  # make
            t_ok, _, _, _ = await poll_until(ports.listener, new, t0, t0 + NEW_DEADLINE_S)
            current = new
            # in the break phase the awaited answer is "refused": its time is r1.new_ok_s
            bbm.runs.append(
                Run(r1.closed_s, t_ok, r1.stale, r1.last_stale_s, r1.correct, r1.new_ok_s)
            )
            print(f"  {approach.name} bbm {i + 1}: {bbm.runs[-1]}", file=sys.stderr)
            if t_ok is None:
                await wait_until(ready, 5, f"{current} to become reachable")
    finally:
        env.stop()
        for s in servers.values():
            s.close()
        with contextlib.suppress(Exception):
            log = env.log.read_text()
            errs = [
                ln
                for ln in log.splitlines()
                if ("error" in ln.lower() or "warn" in ln.lower()) and "SIGTERM" not in ln
            ]
            if errs:
                main.note = errs[-1][-160:]
        shutil.rmtree(tmp, ignore_errors=True)
    return [main, bbm]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def fmt_ms(xs: list[float | None], q: float) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    return f"{pct(vals, q) * 1000:.0f}"


def table(results: list[Result]) -> str:
    head = (
        f"{'approach':<16} {'phase':<6} {'runs':>4} | {'closed p50/p99/max ms':>22} {'not closed':>10} |"
        f" {'new-ok p50/max ms':>17} {'stale(last ms)':>14} {'correct':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if not r.runs:
            continue
        closed = [x.closed_s for x in r.runs]
        newok = [x.new_ok_s for x in r.runs]
        fails = sum(1 for x in closed if x is None)
        vals = [x for x in closed if x is not None]
        cl = f"{fmt_ms(closed, 0.5)}/{fmt_ms(closed, 0.99)}/{max(vals) * 1000:.0f}" if vals else "-"
        nk = f"{fmt_ms(newok, 0.5)}/{fmt_ms(newok, 1.0)}" + (
            f" ({sum(1 for x in newok if x is None)} never)" if None in newok else ""
        )
        corr = sum(1 for x in r.runs if x.correct)
        stale = sum(x.stale for x in r.runs)
        lasts = [x.last_stale_s for x in r.runs if x.last_stale_s is not None]
        st = f"{stale}({max(lasts) * 1000:.0f})" if lasts else "0"
        lines.append(
            f"{r.approach:<16} {r.phase:<6} {len(r.runs):>4} | {cl:>22} {fails:>10} | {nk:>17}"
            f" {st:>14} {corr:>3}/{len(r.runs):<3}"
        )
        if r.phase == "bbm":
            refused = [x.refused_s for x in r.runs]
            lines.append(
                f"{'':<16} {'':<6} {'':>4}   (none phase: first refused p50/max ms "
                f"{fmt_ms(refused, 0.5)}/{fmt_ms(refused, 1.0)})"
            )
    return "\n".join(lines)


def main() -> None:
    global HC_INTERVAL, MERGE_WINDOW, UNHEALTHY_THRESHOLD
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("approaches", nargs="*", help="approach names (default: all)")
    ap.add_argument("-n", "--runs", type=int, default=10, help="switches per approach")
    ap.add_argument("--bbm", type=int, default=5, help="break-before-make rounds per approach")
    ap.add_argument("--list", action="store_true")
    ap.add_argument(
        "--hc-interval", default="0.1s", help="active health check interval (e.g. 0.05s)"
    )
    ap.add_argument(
        "--unhealthy-threshold",
        type=int,
        default=1,
        help="health check unhealthy_threshold (an HTTP 503 fails at once whatever its value)",
    )
    ap.add_argument(
        "--merge-window",
        default="0s",
        help="common_lb_config.update_merge_window of health-checked clusters ('default': unset)",
    )
    ap.add_argument(
        "--envoy-arg", action="append", default=[], help="extra Envoy flag (e.g. --drain-time-s=1)"
    )
    args = ap.parse_args()
    if args.list:
        for a in APPROACHES.values():
            print(f"{a.name:<16} {a.doc}")
        return
    HC_INTERVAL = args.hc_interval
    UNHEALTHY_THRESHOLD = args.unhealthy_threshold
    MERGE_WINDOW = None if args.merge_window == "default" else args.merge_window
    names = args.approaches or list(APPROACHES)
    unknown = [n for n in names if n not in APPROACHES]
    if unknown:
        ap.error(f"unknown approach(es): {', '.join(unknown)}; see --list")
    results: list[Result] = []
    for n in names:
        print(f"== {n}: {APPROACHES[n].doc}", file=sys.stderr)
        results += asyncio.run(measure(APPROACHES[n], args.runs, args.bbm, args.envoy_arg))
    print(f"envoy: {ENVOY} -c bootstrap.yaml --base-id N {' '.join(args.envoy_arg)}")
    print(
        f"hold deadline {HOLD_DEADLINE_S}s; HC interval {HC_INTERVAL}; "
        f"unhealthy_threshold {UNHEALTHY_THRESHOLD}; "
        f"update_merge_window {MERGE_WINDOW or 'default (1s)'}; members {MEMBERS}"
    )
    print(table(results))
    for r in results:
        if r.note:
            print(f"note {r.approach}: {r.note}")


if __name__ == "__main__":
    main()
