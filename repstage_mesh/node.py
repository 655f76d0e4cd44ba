"""One control-plane node: the replicated store, the renderer, the xDS server and the REST API.

Data flow (DESIGN.md): a command is committed through Raft → every node applies it → the
applied state is rendered (pure) → encoded once into a snapshot → the ADS server pushes it to
this node's proxies → the tracker records their ACKs. Only the Raft leader decides (the
failover engine is started and stopped with leadership); every node serves xDS and the API.

`Node` implements `plane.ControlPlane` for the REST API. `serve_main` is `repstage-mesh serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from repstage_mesh.api.app import build_app, start_api
from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.api.peers import PeerClient, PeerProxies
from repstage_mesh.api.snapshots import snapshot_operations
from repstage_mesh.config import ConfigError, Settings, load_config
from repstage_mesh.core.errors import (
    ApiUnreachable,
    CommitTimeout,
    NoLeaderKnown,
    NotReady,
    ReplicationError,
    SwitchoverFailed,
)
from repstage_mesh.core.models import (
    Announcement,
    AnnounceNode,
    Command,
    CommandEnvelope,
    MeshState,
    NodeAddress,
    Outcome,
    PutService,
)
from repstage_mesh.core.observations import ProbeResult
from repstage_mesh.decide import Decider, FailoverRecord, ProxyAcks
from repstage_mesh.failover.announces import Announcer
from repstage_mesh.failover.engine import LeaderEngine, LeaderSeat
from repstage_mesh.failover.history import HistoryPublisher
from repstage_mesh.failover.promote import DatabasePromoter
from repstage_mesh.failover.proxies import NoRemoteProxies, await_proxies
from repstage_mesh.failover.runner import FailoverRunner
from repstage_mesh.failover.traces import FailoverTraces
from repstage_mesh.raft.store import ReplicatedStore
from repstage_mesh.render.envoy import render
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions
from repstage_mesh.snapshots.desk import SnapshotDesk
from repstage_mesh.snapshots.edges import EnvoyAdminCounters, NoCounters
from repstage_mesh.snapshots.registry import build_snapshot_action, member_reports, operator_hook
from repstage_mesh.snapshots.runner import SnapshotDeps, SnapshotRunner
from repstage_mesh.sources.consul import ConsulRegistration, ConsulSource
from repstage_mesh.sources.probes import ProbeRunner
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.metrics import MeshMetrics, write_failure_code
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import Snapshot, SnapshotCache
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tracker import ProxyTracker

log = logging.getLogger("repstage_mesh.node")

SNAPSHOT_GROUP = ""
# seconds a follower waits for the leader to answer a carried announce: above the longest plan
# (two commits, two proxy waits at the longest ack_deadline, the close wait), below the CLI's
FORWARDED_ANNOUNCE_TIMEOUT = 150.0


def render_options(settings: Settings) -> RenderOptions:
    """How this deployment renders state into Envoy config (the same on every node)."""
    return settings.envoy.render_options(settings.telemetry)


class Node:
    """A running control-plane node. Create, `await start()`, `await stop()`.

    The composition root: `__init__` builds every part (metrics, tracing, xDS, the decider,
    the failover runner, the leader engine and its sources) and wires them; `start` adds the
    parts that bind (the Raft store, the xDS and API listeners).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._node_id = settings.node.id
        self._registry = CollectorRegistry()
        self.options = render_options(settings)
        # health_fence: the fence's answers (routes) must reach Envoy before the endpoints
        # that are checked against them, or a promoted member fails its first check and waits
        # a whole interval to become routable.
        self.order = (
            (res.CLUSTER, res.ROUTE, res.ENDPOINT, res.LISTENER, res.SECRET)
            if self.options.primary_strategy is PrimaryStrategy.HEALTH_FENCE
            else res.ADS_ORDER
        )
        self.store: ReplicatedStore | None = None
        self.cache = SnapshotCache()
        self.tracker = ProxyTracker(control_plane=self._node_id)
        self.metrics = MeshMetrics(
            self._registry, self._node_id,
            raft_status=lambda: self.store.status() if self.store is not None else None,
        )
        self.tracker.observers.append(self.metrics)
        self.tracing = Tracing.setup(settings.telemetry, self._node_id)
        self.push_tracer = self.tracing.push_tracer()
        self.push_tracer.attach(self.tracker)
        self.xds = AdsServer(self.cache, self.tracker, control_plane_id=self._node_id)
        self.api_runner: web.AppRunner | None = None
        self.api_port: int | None = None
        self.xds_port: int | None = None
        self._rendered_change = -1
        self._ready = False
        self._apply_listeners: list[Callable[[MeshState], None]] = []
        self._pending_state: MeshState | None = None
        self._traced: list[tuple[int, dict[str, str], float]] = []
        self._started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._peers = PeerClient(_first_token(settings, read_only=False))
        self._build_leader_engine()

    def _build_leader_engine(self) -> None:
        """The decider, the runner, the failover traces, the engine and its sources."""
        settings = self.settings
        self.decider = Decider(self._node_id, wall_offset=time.time() - time.monotonic())
        traces = FailoverTraces(self.tracing, self.metrics, self.decider, self.state)
        self.history = HistoryPublisher(
            self._commit, keep=settings.failovers.history, keep_keys=settings.failovers.idempotency_keys,
            metrics=self.metrics,
        )
        self.runner = FailoverRunner(
            self.decider, traces.traced(self._commit), self._confirm_leadership,
            self.await_proxies, DatabasePromoter(), on_done=traces.done, history=self.history,
        )
        self.announcer = Announcer(self.runner, self.state, self.failover, _close_wait(settings))
        seat = LeaderSeat(
            node_id=self._node_id, state=self.state, ready=self.ready,
            believes_leader=lambda: self.store is not None and self.store.is_leader(),
            confirm_leadership=self._confirm_leadership,
        )
        self.engine = LeaderEngine(seat, self.runner, on_observation=traces.observed)
        self.engine.add_source(ProbeRunner(self.engine.observe, on_probe=self._count_probe))
        consul = settings.consul
        token = consul.token.get_secret_value() if consul.token is not None else None
        if consul.address:
            self.engine.add_source(ConsulSource(self.engine.observe, address=consul.address, token=token))
        self.registration: ConsulRegistration | None = (
            ConsulRegistration(address=consul.address, token=token)
            if consul.address and consul.register_service
            else None
        )
        self._apply_listeners.append(self.engine.on_state)
        self._build_snapshots()

    def _build_snapshots(self) -> None:
        """The snapshot runner: only the leader runs it (an engine companion); every applied
        state reaches it (a failover's abort cancels the running step)."""
        snap = self.settings.snapshots
        self.snapshots = SnapshotRunner(SnapshotDeps(
            node_id=self._node_id, settings=snap, state=self.state,
            commit=lambda command, timeout: self._commit(CommandEnvelope(command=command, request_id=uuid.uuid4().hex), timeout),
            await_proxies=self.await_proxies, actions=lambda kind: build_snapshot_action(kind, snap),
            hooks=lambda name: operator_hook(self.settings, name), reports=lambda service: member_reports(self.decider, service),
            connections=EnvoyAdminCounters(snap.envoy_admins) if snap.envoy_admins else NoCounters(),
            tracing=self.tracing, metrics=self.metrics,
        ))
        self._apply_listeners.append(self.snapshots.on_state)
        self.engine.add_companion(self.snapshots.take_over, self.snapshots.stop)
        self.snapshot_desk = SnapshotDesk(
            self.snapshots, self.state, self._leader_api, self._peers.call, lambda: self.engine.active,
        )

    # --- ControlPlane -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def state(self) -> MeshState:
        return self.store.state if self.store is not None else MeshState()

    async def read_state(self, consistent: bool = False) -> MeshState:
        if not consistent or self.store is None:
            return self.state()
        return await self.store.read_barrier(timeout=5.0)

    async def submit(self, command: Command, timeout: float = 5.0) -> Outcome:
        if self.store is None:
            raise RuntimeError("node not started")
        envelope = CommandEnvelope(command=command, request_id=uuid.uuid4().hex)
        started = time.perf_counter()
        try:
            outcome = await self.store.submit(envelope, timeout)
        except ReplicationError as exc:
            self.metrics.observe_write_failure(write_failure_code(exc))
            raise
        self.metrics.observe_commit(time.perf_counter() - started)
        if not outcome.ok and outcome.rejection is not None:
            self.metrics.observe_write_failure(outcome.rejection.code)
        return outcome

    def proxies(self) -> list[dict[str, Any]]:
        return self.tracker.to_list()

    def cluster(self) -> dict[str, Any]:
        status: dict[str, Any] = self.store.status() if self.store is not None else {}
        status.update(
            {
                "node": self._node_id,
                "xds_port": self.xds_port,
                "api_port": self.api_port,
                "snapshot_version": self.cache.get(SNAPSHOT_GROUP).version  # type: ignore[union-attr]
                if self.cache.get(SNAPSHOT_GROUP)
                else None,
                "connected_proxies": len(self.tracker.connected()),
                "nodes": [n.model_dump() for n in self.state().nodes.values()],
                "started_at": self._started_at,
            }
        )
        return status

    def ready(self) -> bool:
        return self._ready

    def failover_records(self) -> list[FailoverRecord]:
        """The records this node ran (while it led), newest first; `failovers()` is the cluster's."""
        return self.decider.records()

    # --- what the leader engine and the failover runner are given ----------------------------

    async def _commit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        """The runner's and the history's commits (counted like the API's)."""
        store = self.store
        if store is None:
            raise RuntimeError("node stopped")
        started = time.perf_counter()
        try:
            outcome = await store.submit(envelope, timeout)
        except ReplicationError as exc:
            self.metrics.observe_write_failure(write_failure_code(exc))
            raise
        self.metrics.observe_commit(time.perf_counter() - started)
        return outcome

    async def _confirm_leadership(self, timeout: float) -> bool:
        store = self.store
        return store is not None and await store.confirm_leadership(timeout)

    def _count_probe(self, service: str, member: str, result: ProbeResult) -> None:
        """Every probe answer, for repstage_probe_results_total (role, or how it failed)."""
        outcome = result.role.value if result.role is not None else result.outcome.value
        self.metrics.observe_probe(service, member, outcome)

    async def await_proxies(self, min_index: int, timeout: float) -> ProxyAcks:
        """Until every proxy of EVERY control-plane node holds a snapshot at or after
        `min_index`, or `timeout` (failover/proxies.py)."""
        others = [n for n in self.state().nodes.values() if n.node_id != self._node_id]
        remote = PeerProxies(others, _first_token(self.settings, read_only=True)) if others else NoRemoteProxies()
        return await await_proxies(self.tracker, remote, min_index, timeout)

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        data_dir = Path(settings.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        raft = settings.raft
        peers = [str(p) for p in raft.peers] if raft.multi_node else []
        self.store = await loop.run_in_executor(
            None,
            lambda: ReplicatedStore(
                self._node_id,
                raft.bind if raft.multi_node else None,
                peers,
                data_dir,
                password=settings.raft_password(),
                on_apply=self._on_apply,
                on_role_change=lambda _leader: self.engine.leadership_changed(),
                loop=loop,
            ),
        )
        self._on_apply(self.store.state, None)  # what the journal already holds
        self._flush()
        host, port = settings.host_port("xds.listen")
        self.xds_port = await self.xds.start(host, port)
        app = build_app(self, ApiSettings.from_config(settings.api), extra_operations=[*failover_operations(), *snapshot_operations()])
        api_host, api_port = settings.host_port("api.listen")
        self.api_runner = await start_api(app, api_host, api_port)
        from repstage_mesh.api.app import bound_port

        self.api_port = bound_port(self.api_runner)
        self._tasks.append(asyncio.create_task(self._seed_services(), name="seed-services"))
        self.engine.start()
        await self._register_in_consul(f"{api_host}:{self.api_port}")
        log.info(
            "node %s: xDS on %s:%d, API on %s:%d, %s",
            self._node_id, host, self.xds_port, api_host, self.api_port,
            f"raft {raft.bind} with peers {peers}" if peers else "single node",
        )

    async def _register_in_consul(self, api_address: str) -> None:
        if self.registration is None:
            return
        try:
            await self.registration.register_self(self._node_id, api_address)
        except Exception as exc:
            log.warning("could not register in Consul at %s: %s", self.settings.consul.address, exc)

    async def stop(self) -> None:
        await self.engine.stop()
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        await self.xds.stop(0.5)
        loop = asyncio.get_running_loop()
        if self.store is not None:
            store, self.store = self.store, None
            await loop.run_in_executor(None, store.close)
        await loop.run_in_executor(None, self.tracing.shutdown)

    # --- applied state -> xDS -----------------------------------------------------------------

    def on_apply(self, listener: Callable[[MeshState], None]) -> None:
        self._apply_listeners.append(listener)

    def _on_apply(self, state: MeshState, outcome: Outcome | None = None) -> None:
        """Runs on the event loop after each applied entry (in log order). Listeners see every
        state; rendering is coalesced: a burst of entries (a journal replay, a busy leader) is
        rendered and pushed once, after the last of them in this pass of the event loop."""
        trace = outcome.result.get("trace") if outcome is not None and outcome.ok else None
        if trace and self._ready:
            # A traced change of primary: this node's push to its proxies joins the trace.
            service = state.service(str(outcome.result.get("service"))) if outcome else None
            deadline = service.spec.leadership.ack_deadline if service is not None else 2.0
            self._traced.append((state.last_change, dict(trace), deadline))
        if self._pending_state is None:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending_state = state
        for listener in self._apply_listeners:
            try:
                listener(state)
            except Exception:
                log.exception("apply listener failed")

    def _flush(self) -> None:
        state, self._pending_state = self._pending_state, None
        if state is not None and state.last_change != self._rendered_change:
            self._publish(state)
        traced, self._traced = self._traced, []
        for index, context, deadline in traced:
            self.push_tracer.begin(index, context, timeout=deadline)

    def _publish(self, state: MeshState) -> None:
        try:
            previous = self.cache.get(SNAPSHOT_GROUP)
            snapshot = Snapshot.build(state.last_change, render(state, self.options), previous, self.order)
        except Exception:
            log.exception("rendering state at index %d failed; proxies keep the last good config", state.index)
            return
        if previous is not None and snapshot.index < previous.index:
            return
        self._rendered_change = state.last_change
        self.cache.set_snapshot(SNAPSHOT_GROUP, snapshot)

    async def _seed_services(self) -> None:
        """Define the config file's services that the replicated state does not hold yet.

        The file seeds; afterwards the REST API owns a service. A service whose spec in the
        file differs from the replicated one is reported, not overwritten.
        """
        assert self.store is not None
        specs = self.settings.specs()
        while True:
            try:
                state = await self.store.read_barrier(timeout=5.0)
            except Exception as exc:
                log.info("waiting for the cluster before seeding services: %s", exc)
                await asyncio.sleep(0.5)
                continue
            break
        for spec in specs:
            have = state.service(spec.name)
            if have is None:
                try:
                    await self.submit(PutService(spec=spec), timeout=10.0)
                except Exception as exc:
                    log.warning("could not define service %s from the config file: %s", spec.name, exc)
            elif have.spec.model_copy(update={"primary": spec.primary}) != spec:
                log.warning(
                    "service %s in the config file differs from the replicated state; the "
                    "replicated one is kept (change it with PUT /v1/services/%s)", spec.name, spec.name,
                )
        await self._announce()
        self._ready = True
        self.engine.leadership_changed()

    async def _announce(self) -> None:
        """Tell the cluster where this node's API answers (followers carry requests there)."""
        assert self.store is not None
        api_host, _ = self.settings.host_port("api.listen")
        xds_host, _ = self.settings.host_port("xds.listen")
        me = NodeAddress(
            node_id=self._node_id,
            raft=self.settings.raft.bind if self.settings.raft.multi_node else None,
            api=f"{_reachable(api_host)}:{self.api_port}",
            xds=f"{_reachable(xds_host)}:{self.xds_port}",
        )
        if self.state().nodes.get(self._node_id) == me:
            return
        for _ in range(20):
            try:
                await self.submit(AnnounceNode(node=me), timeout=5.0)
                return
            except Exception as exc:
                log.info("could not announce this node yet: %s", exc)
                await asyncio.sleep(0.5)

    # --- failovers: the leader runs them, followers carry requests to it ----------------------

    def _leader_api(self) -> str | None:
        """HOST:PORT of the leader's API, None if this node leads. Raises NoLeaderKnown."""
        store = self.store
        if store is None or store.is_leader():
            return None
        leader = store.leader()
        for node in self.state().nodes.values():
            if leader is not None and node.raft == leader:
                return node.api
        raise NoLeaderKnown("no Raft leader is known to this node right now; retry shortly")

    async def failovers(self) -> tuple[str, list[dict[str, Any]]]:
        """The replicated history as this node holds it, newest first; the records this node
        is running are shown as they are now (fresher than their last commit)."""
        return self._node_id, [self._fresh(entry.id, entry.record) for entry in reversed(self.state().failovers)]

    async def failover(self, record_id: str) -> dict[str, Any] | None:
        entry = self.state().failover(record_id)
        if entry is not None:
            return self._fresh(record_id, entry.record)
        record = self.decider.record(record_id)  # running here, its first commit not applied yet
        return record.as_dict() if record is not None else None

    def _fresh(self, record_id: str, replicated: dict[str, Any]) -> dict[str, Any]:
        record = self.decider.record(record_id)
        return record.as_dict() if record is not None else dict(replicated)

    async def announce(self, service: str, announcement: Announcement) -> dict[str, Any]:
        """Run an announced change on the leader (a follower carries it there) and answer with
        the primary after it and its failover record. An idempotency key already used answers
        what its first use did (waiting for it if it is still running)."""
        api = self._leader_api()
        if api is not None:
            return await self._forward_announce(api, service, announcement)
        if not self.engine.active:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        return await self.announcer.run(service, announcement)

    async def _forward_announce(self, api: str, service: str, announcement: Announcement) -> dict[str, Any]:
        body: dict[str, Any] = {"member": announcement.member, "cause": announcement.cause,
                                "fence": announcement.fence}
        if announcement.token is not None:
            body["epoch"] = announcement.token
        if announcement.key is not None:
            body["idempotency_key"] = announcement.key
        path = f"/v1/services/{quote(service, safe='')}/primary"
        # A leader that cannot be reached through Raft will not answer over HTTP either: fail
        # within the commit timeout (503/504) instead of waiting on a frozen or partitioned one.
        await self.read_state(consistent=True)
        bound = FORWARDED_ANNOUNCE_TIMEOUT
        try:
            async with asyncio.timeout(bound):
                return dict(await self._peers.call(api, "POST", path, body, headers=announcement.trace or {}))
        except TimeoutError:
            raise CommitTimeout(f"the leader at {api} did not answer the announce within {bound:g} s") from None
        except ApiUnreachable as exc:
            if isinstance(exc.__cause__, aiohttp.ClientConnectorError):  # never reached the leader
                raise NoLeaderKnown(f"the leader's API at {api} cannot be reached: {exc}") from exc
            raise CommitTimeout(f"the announce was carried to the leader at {api}, which gave no answer: {exc}") from exc

    # --- snapshots (snapshots/desk.py) ---------------------------------------------------------

    async def start_snapshot(self, service: str, member: str) -> dict[str, Any]:
        return await self.snapshot_desk.start(service, member)

    async def list_snapshots(self, service: str) -> list[dict[str, Any]] | None:
        return self.snapshot_desk.list(service)

    async def get_snapshot(self, service: str, snapshot_id: str) -> dict[str, Any] | None:
        return self.snapshot_desk.get(service, snapshot_id)

    async def switchover(self, service: str, to: str, timeout: float | None) -> dict[str, Any]:
        api = self._leader_api()
        if api is not None:
            body: dict[str, Any] = {"to": to}
            if timeout is not None:
                body["timeout"] = timeout
            return dict(await self._peers.call(api, "POST", f"/v1/services/{service}/switchover", body))
        if not self.engine.active:
            raise NotReady("this node leads but has not started deciding yet; retry shortly")
        record = await self.runner.switchover(service, to, timeout)
        if record.status == "failed":
            raise SwitchoverFailed(f"switchover {record.id} failed: {record.reason}", record.as_dict())
        return record.as_dict()


def _close_wait(settings: Settings) -> float:
    """Seconds from the fence's ACK until every proxy closed its connections to the old primary:
    with the health fence, one check interval (plus a tenth, at least 10 ms, for the check's
    answer and the close); other strategies never close them (nothing to wait for)."""
    envoy = settings.envoy
    if envoy.primary_strategy is not PrimaryStrategy.HEALTH_FENCE:
        return 0.0
    interval = envoy.fence_interval_ms / 1000.0
    return interval + max(0.01, interval / 10)


def _first_token(settings: Settings, *, read_only: bool) -> str | None:
    """The token this node shows another node's API: a read-write one, or for reads the first
    read-only one (a read-write one when there is none)."""
    tokens = settings.api.tokens
    if tokens is None:
        return None
    choice = (tokens.read_only or tokens.read_write) if read_only else tokens.read_write
    return choice[0].get_secret_value() if choice else None


def _reachable(host: str) -> str:
    """A wildcard bind address is announced as loopback (set a concrete listen address in
    multi-host deployments)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


async def run_until_signalled(start: Callable[[], Awaitable[Node]]) -> None:
    node = await start()
    # Start-up objects (modules, messages, config) never die: keep the collector from walking
    # them on every push (bench: ~30% less server CPU per push at 5,000 streams).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await node.stop()


def serve_main(args: Any) -> int:
    """`repstage-mesh serve --config FILE`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(str(exc))
        return 1

    async def start() -> Node:
        node = Node(settings)
        await node.start()
        return node

    try:
        asyncio.run(run_until_signalled(start))
    except OSError as exc:
        print(f"error: {exc}")
        return 1
    return 0
