"""One control-plane node: the replicated store, the renderer, the xDS server and the REST API.

Data flow (DESIGN.md): a command is committed through Raft → every node applies it → the
applied state is rendered (pure) → encoded once into a snapshot → the ADS server pushes it to
this node's proxies → the tracker records their ACKs. Only the Raft leader decides (the
failover engine is started and stopped with leadership); every node serves xDS and the API.
`Node` implements `plane.ControlPlane` for the REST API; `cli/serve.py` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from repstage_mesh.api.app import bound_port, build_app, start_api
from repstage_mesh.api.cluster import ClusterViews
from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.api.forwarding import Forwarder
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.api.peers import PeerClient
from repstage_mesh.api.progress import PeerProgress
from repstage_mesh.api.snapshots import snapshot_operations
from repstage_mesh.config import Settings, listening
from repstage_mesh.config.drift import ServiceDrift, drift
from repstage_mesh.config.xds_sections import XdsConfig
from repstage_mesh.core.addresses import join_host_port
from repstage_mesh.core.errors import (
    ReplicationError,
)
from repstage_mesh.core.models import (
    AnnounceNode,
    AuditTag,
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
from repstage_mesh.failover.proxies import Progress, await_proxies, local_progress
from repstage_mesh.failover.runner import FailoverRunner
from repstage_mesh.failover.steplog import StepLog
from repstage_mesh.failover.traces import FailoverTraces
from repstage_mesh.leader_requests import LeaderRequests
from repstage_mesh.raft.lease import PrimaryLease
from repstage_mesh.raft.store import ReplicatedStore
from repstage_mesh.render.envoy import render
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions
from repstage_mesh.snapshots.registry import SnapshotWiring, build_snapshots
from repstage_mesh.sources.consul import ConsulSource
from repstage_mesh.sources.consul_registration import ConsulRegistration
from repstage_mesh.sources.probes import ProbeRunner
from repstage_mesh.telemetry import Tracing
from repstage_mesh.telemetry.metrics import MeshMetrics, write_failure_code
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import Snapshot, SnapshotCache
from repstage_mesh.xds.limits import XdsLimits
from repstage_mesh.xds.server import AdsServer, GuardObserver
from repstage_mesh.xds.tls import NodeIdentity, TlsFiles, XdsSecurity
from repstage_mesh.xds.tracker import ProxyTracker
from repstage_mesh.xds.workers import WorkerPool, default_count

log = logging.getLogger("repstage_mesh.node")

SNAPSHOT_GROUP = ""


def render_options(settings: Settings) -> RenderOptions:
    """How this deployment renders state into Envoy config (the same on every node)."""
    return settings.envoy.render_options(settings.telemetry)


class Node(LeaderRequests):
    """A running control-plane node (`await start()`, `await stop()`). The composition root:
    `__init__` builds and wires every part; `start` adds the ones that bind (Raft, xDS, API)."""

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
        self.tracker = ProxyTracker(
            control_plane=self._node_id, never_acked_grace=settings.xds.never_acked_grace,
            max_disconnected=settings.xds.limits.max_disconnected_proxies,
        )
        self.metrics = MeshMetrics(
            self._registry, self._node_id,
            raft_status=lambda: self.store.status() if self.store is not None else None,
            state=self.state, leads=lambda: self.store is not None and self.store.is_leader(),
        )
        self.tracker.observers.append(self.metrics)
        self.tracker.on_limit = self.metrics.on_limit
        self.tracing = Tracing.setup(settings.telemetry, self._node_id)
        self.push_tracer = self.tracing.push_tracer()
        self.push_tracer.attach(self.tracker)
        workers = settings.xds.workers if settings.xds.workers is not None else default_count()
        self.xds = (WorkerPool(workers, self.cache, self.tracker, self._node_id, group=SNAPSHOT_GROUP,
                               on_restart=self.metrics.xds_worker_restarts.inc, **xds_server_args(settings.xds, self.metrics))
                    if workers else AdsServer(self.cache, self.tracker, self._node_id, **xds_server_args(settings.xds, self.metrics)))
        self.lease = PrimaryLease.build(settings.xds.primary_lease_ms, lambda: self.store, self._flush,
                                        self.xds.renew, lambda: self._publish(self.state()))
        self.metrics.lease = self.lease.renewer if self.lease is not None else None
        self.api_runner: web.AppRunner | None = None
        self.api_port: int | None = None
        self.xds_port: int | None = None
        self._rendered_change = -1
        self._hold_timer: asyncio.TimerHandle | None = None  # re-render at a consistent point's deadline
        self._ready = False
        self._apply_listeners: list[Callable[[MeshState], None]] = []
        self._pending_state: MeshState | None = None
        self._traced: list[tuple[int, dict[str, str], float]] = []
        self._started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []
        self._peer_tls = settings.api.tls.client_context() if settings.api.tls is not None else None
        self._forwarder = Forwarder(PeerClient(self._node_id, tls=self._peer_tls), self.metrics.observe_forward)
        self._build_leader_engine()
        self.cluster_views = ClusterViews(self._node_id, self.state, self.proxies, self.decider.status, self._leader_api,
                                          lambda: self.store is not None and self.store.is_leader(), self._forwarder.peers,
                                          settings.api.peer_timeout, self.metrics.observe_peer_unreachable, self._peer_tls)  # fmt: skip

    def _build_leader_engine(self) -> None:
        """The decider, the runner, the failover traces, the engine and its sources."""
        settings = self.settings
        self.decider = Decider(self._node_id, wall_offset=time.time() - time.monotonic())
        traces = FailoverTraces(self.tracing, self.metrics, self.decider, self.state)
        secrets = settings.secret_store()
        self.history = HistoryPublisher(
            self._commit, keep=settings.failovers.history, keep_keys=settings.failovers.idempotency_keys,
            metrics=self.metrics,
        )
        self.runner = FailoverRunner(
            self.decider, traces.traced(self._commit), self._confirm_leadership,
            self.await_proxies, DatabasePromoter(settings.hooks, secrets), on_done=traces.done, history=self.history,
            on_change=StepLog(self.state).changed,
        )
        self.announcer = Announcer(self.runner, self.state, self.failover, _close_wait(settings))
        seat = LeaderSeat(
            node_id=self._node_id, state=self.state, ready=self.ready,
            believes_leader=lambda: self.store is not None and self.store.is_leader(),
            confirm_leadership=self._confirm_leadership,
        )
        self.engine = LeaderEngine(seat, self.runner, on_observation=(traces.observed, self.metrics.services.observed))
        self.engine.add_source(ProbeRunner(self.engine.observe, on_probe=self._count_probe,
                                           secrets=secrets.for_host))
        consul = settings.consul
        token = consul.token.get_secret_value() if consul.token is not None else None
        if consul.address:
            self.engine.add_source(ConsulSource(
                self.engine.observe, address=consul.address, token=token,
                on_anomaly=self.metrics.observe_consul_anomaly,
                max_query_rate=consul.max_query_rate, query_burst=consul.query_burst,
            ))
        self.registration: ConsulRegistration | None = (
            ConsulRegistration(
                address=consul.address, token=token, register_address=consul.register_address,
                check_interval=consul.check_interval, deregister_after=consul.deregister_after,
                resync_interval=consul.resync_interval,
                on_restore=self.metrics.consul_reregistrations.inc,
            )
            if consul.address and consul.register_service
            else None
        )
        self._apply_listeners.append(self.engine.on_state)
        self.snapshots, self.snapshot_desk = build_snapshots(SnapshotWiring(  # snapshots/registry.py
            self._node_id, self.settings, self.state, self._commit, self.await_proxies, self.decider, self.engine, self.tracing, self.metrics, self._forwarder.peers.call, self._leader_api, self._apply_listeners.append))

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
        snap = self.cache.get(SNAPSHOT_GROUP)
        status.update({
            "node": self._node_id, "xds_port": self.xds_port, "api_port": self.api_port,
            "snapshot_version": snap.version if snap else None,
            "connected_proxies": len(self.tracker.connected()),
            "nodes": [n.model_dump() for n in self.state().nodes.values()],
            "started_at": self._started_at,
            "config_drift": [d.as_dict() for d in self.config_drift()],
        })  # fmt: skip
        return status

    def config_drift(self) -> list[ServiceDrift]:
        """File services that differ from the replicated ones (API-only services are not drift)."""
        replicated = {name: svc.spec for name, svc in self.state().services.items()}
        return [d for d in drift(self.settings.specs(), replicated) if d.kind != "unmanaged"]

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
        """Until every proxy of EVERY node holds `min_index`, or `timeout` (failover/proxies.py)."""
        token = _first_token(self.settings, read_only=True)
        remotes = [
            PeerProgress(n.node_id, n.api, token, self._peer_tls)
            for n in self.state().nodes.values() if n.node_id != self._node_id and n.api
        ]
        return await await_proxies(self.tracker, self._node_id, remotes, min_index, timeout, lease=self.lease.bound if self.lease else None)

    async def proxy_progress(self, min_index: int, wait: float) -> Progress:
        return await local_progress(self.tracker, self._node_id, min_index, wait)

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        data_dir = Path(settings.node.data_dir)
        raft = settings.raft
        peers = [str(p) for p in raft.peers] if raft.multi_node else []
        self.store = await loop.run_in_executor(
            None,
            lambda: ReplicatedStore(
                self._node_id,
                raft.identity if raft.multi_node else None,
                peers,
                data_dir,
                bind_address=raft.bind,
                password=settings.raft_password(),
                durable_journal=raft.durable_journal,
                unauthenticated_frame_limit=raft.unauthenticated_frame_limit,
                on_apply=self._on_apply,
                on_role_change=lambda _leader: self.engine.leadership_changed(),
                loop=loop,
            ),
        )
        self._on_apply(self.store.state, None)  # what the journal already holds
        self._flush()
        host, port = settings.host_port("xds.listen")
        with listening("xds.listen", host, port):  # a bind that fails names its field
            self.xds_port = await self.xds.start(host, port)
        api_settings = ApiSettings.from_config(settings.api, hooks=settings.hooks,
                                               secrets=settings.secret_store().hosts(), deployment=settings.deployment())
        app = build_app(self, api_settings, extra_operations=[*failover_operations(), *snapshot_operations(self.snapshot_desk)])
        api_host, api_port = settings.host_port("api.listen")
        with listening("api.listen", api_host, api_port):
            self.api_runner = await start_api(app, api_host, api_port)
        self.api_port = bound_port(self.api_runner)
        self._tasks.append(asyncio.create_task(self._seed_services(), name="seed-services"))
        self.engine.start()
        self._tasks += [asyncio.create_task(self.lease.run(), name="primary-lease")] if self.lease else []
        await self._register_in_consul(settings.api.advertise or join_host_port(api_host, self.api_port))
        log.info(
            "node %s: xDS on %s:%d (advertised %s), API on %s:%d (advertised %s), %s",
            self._node_id, host, self.xds_port, settings.xds.advertised(self.xds_port),
            api_host, self.api_port, settings.api.advertised(self.api_port),
            f"raft on {raft.bind} as {raft.identity} with peers {peers}" if peers else "single node",
        )

    async def _register_in_consul(self, api_address: str) -> None:
        if self.registration is None:
            return
        try:
            await self.registration.register_self(self._node_id, api_address)
        except Exception as exc:
            log.warning("could not register in Consul at %s: %s (retried every %g s)",
                        self.settings.consul.address, exc, self.settings.consul.resync_interval)

    async def stop(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
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
        await self._forwarder.peers.close()
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
        self.metrics.services.applied(state, outcome, ready=self._ready)  # role-change log, gauges
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
            state, ttls = self.lease.shape(state, self.options) if self.lease is not None else (state, None)
            held = self._held(state)
            snapshot = Snapshot.build(state.last_change, render(state, self.options, held), previous, self.order, ttls)
        except Exception:
            log.exception("rendering state at index %d failed; proxies keep the last good config", state.index)
            return
        if previous is not None and snapshot.index < previous.index:
            return
        self._rendered_change = state.last_change
        self.cache.set_snapshot(SNAPSHOT_GROUP, snapshot)

    def _held(self, state: MeshState) -> frozenset[str]:
        """The services a consistent point holds now; at the earliest committed deadline this
        node renders again without them, by its own clock, whoever leads (or nobody)."""
        now = time.time()
        held = state.held_services(now)
        ends = [h.hold_until for h in state.holds if h.holding(now)]
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        with contextlib.suppress(RuntimeError):  # no loop: a test rendering synchronously
            if ends:
                loop = asyncio.get_running_loop()
                self._hold_timer = loop.call_later(min(ends) - now + 0.001, lambda: self._publish(self.state()))
        return held

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
                    seeded = PutService(spec=spec, by=AuditTag(
                        actor="control-plane", keep=self.settings.api.audit_entries))
                    await self.submit(seeded, timeout=10.0)
                except Exception as exc:
                    log.warning("could not define service %s from the config file: %s", spec.name, exc)
        for item in self.config_drift():
            if item.kind == "changed":
                log.warning(
                    "config drift: service %s in the config file differs from the replicated "
                    "state in %s; the replicated one is kept (see `repstage-mesh status`; apply "
                    "the file with `repstage-mesh apply FILE`)", item.service, ", ".join(item.fields),
                )
        await self._announce()
        self._ready = True
        self.engine.leadership_changed()

    async def _announce(self) -> None:
        """Tell the cluster where this node's API answers (followers carry requests there)."""
        assert self.store is not None
        settings = self.settings
        me = NodeAddress(
            node_id=self._node_id,
            raft=settings.raft.identity if settings.raft.multi_node else None,
            api=settings.api.advertised(self.api_port),
            xds=settings.xds.advertised(self.xds_port),
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
    if read_only:
        return tokens.first("read_only") or tokens.first("read_write")
    return tokens.first("read_write")


def xds_limits(xds: XdsConfig) -> XdsLimits:
    return XdsLimits(**xds.limits.model_dump())


def xds_server_args(xds: XdsConfig, guard: GuardObserver) -> dict[str, Any]:
    return {"limits": xds_limits(xds), "security": xds_security(xds), "guard": guard, "transport": xds.transport}


def xds_security(xds: XdsConfig) -> XdsSecurity:
    if xds.tls is None:
        return XdsSecurity(insecure=xds.insecure)
    tls = xds.tls
    return XdsSecurity(
        tls=TlsFiles(tls.cert_file, tls.key_file, tls.ca_file),
        identity=NodeIdentity.parse(tls.node_san),
        insecure=xds.insecure,
    )
