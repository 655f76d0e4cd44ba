"""What only the Raft leader does: watch the members (probes, Consul), decide, and run
failovers and switchovers — wired to the node's store, proxy tracker, metrics and traces.

The decider (decider.py) is sans-IO; the runner (failover.py) executes its steps; this module
starts them when this node becomes leader and stops them when it stops being leader. The
runner confirms leadership (a committed no-op in the current term) before every plan, so a
stale leader that still believes it leads cannot act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from repstage_mesh.core.models import CommandEnvelope, MeshState, Outcome, SetPrimary
from repstage_mesh.core.observations import MemberStatus, Observation, ProbeResult
from repstage_mesh.decide import Decider, FailoverRecord, ProxyAcks
from repstage_mesh.failover.promote import DatabasePromoter
from repstage_mesh.failover.runner import FailoverRunner
from repstage_mesh.sources.consul import ConsulRegistration, ConsulSource
from repstage_mesh.sources.probes import ProbeRunner
from repstage_mesh.telemetry import FailoverTrace

if TYPE_CHECKING:
    from repstage_mesh.node import Node

log = logging.getLogger("repstage_mesh.failover.engine")

LEADERSHIP_POLL = 0.1


class LeaderEngine:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.decider = Decider(node.node_id, wall_offset=time.time() - time.monotonic())
        self.runner = FailoverRunner(
            self.decider,
            self._submit,
            self._confirm,
            self.await_proxies,
            DatabasePromoter(),
            on_done=self._done,
        )
        self.probes = ProbeRunner(self._observe, on_probe=self._probed)
        consul = node.settings.consul
        token = consul.token.get_secret_value() if consul.token is not None else None
        self.consul: ConsulSource | None = (
            ConsulSource(self._observe, address=consul.address, token=token) if consul.address else None
        )
        self.registration: ConsulRegistration | None = (
            ConsulRegistration(address=consul.address, token=token)
            if consul.address and consul.register_service
            else None
        )
        self.active = False
        self._traces: dict[str, FailoverTrace] = {}
        # (service, member) -> monotonic time of the first failed probe of its current DOWN
        # streak: a failover trace (and its detection span) starts there.
        self._down_since: dict[tuple[str, str], float] = {}
        self._watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_leadership(), name="leadership")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._deactivate("node stopping")
        if self.registration is not None:
            with contextlib.suppress(Exception):
                await self.registration.stop()

    async def register_in_consul(self, api_address: str) -> None:
        if self.registration is None:
            return
        try:
            await self.registration.register_self(self.node.node_id, api_address)
        except Exception as exc:
            log.warning("could not register in Consul at %s: %s", self.node.settings.consul.address, exc)

    async def _watch_leadership(self) -> None:
        while True:
            store = self.node.store
            leader = store is not None and store.is_leader() and self.node.ready()
            if leader and not self.active:
                await self._activate()
            elif not leader and self.active:
                await self._deactivate("this node is no longer the Raft leader")
            await asyncio.sleep(LEADERSHIP_POLL)  # a periodic check, not synchronisation

    async def _activate(self) -> None:
        async with self._lock:
            store = self.node.store
            if store is None or not await store.confirm_leadership(2.0):
                return
            state = self.node.state()
            self.runner.on_state(state)
            self.probes.set_services(state.services.values())
            await self.probes.start()
            if self.consul is not None:
                self.consul.set_services(state.services.values())
                await self.consul.start()
            self.runner.start()
            self.active = True
            log.info("leader %s: watching %d service(s)", self.node.node_id, len(state.services))

    async def _deactivate(self, reason: str) -> None:
        async with self._lock:
            if not self.active:
                return
            self.active = False
            await self.runner.close(reason)
            await self.probes.stop()
            if self.consul is not None:
                await self.consul.stop()
            log.info("%s: stopped deciding (%s)", self.node.node_id, reason)

    # --- state and observations -----------------------------------------------------------------

    def on_state(self, state: MeshState) -> None:
        """Every applied state, in log order (also while not leader: the decider stays current)."""
        self.runner.on_state(state)
        if self.active:
            self.probes.set_services(state.services.values())
            if self.consul is not None:
                self.consul.set_services(state.services.values())

    def _probed(self, service: str, member: str, result: ProbeResult) -> None:
        """Every probe answer, for repstage_probe_results_total (role, or how it failed)."""
        outcome = result.role.value if result.role is not None else result.outcome.value
        self.node.metrics.observe_probe(service, member, outcome)

    def _observe(self, obs: Observation) -> None:
        key = (obs.service, obs.member)
        if obs.status is MemberStatus.DOWN:
            if key not in self._down_since:
                self._down_since[key] = obs.since if obs.since is not None else obs.at
        else:
            self._down_since.pop(key, None)
        if self.active:
            self.runner.observe(obs)

    # --- what the runner needs ------------------------------------------------------------------

    async def _confirm(self, timeout: float) -> bool:
        store = self.node.store
        return store is not None and await store.confirm_leadership(timeout)

    async def _submit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        command = envelope.command
        if isinstance(command, SetPrimary):
            ft = self._trace_for(command)
            context = ft.context()
            if context:
                envelope = envelope.model_copy(update={"command": command.model_copy(update={"trace": context})})
        store = self.node.store
        if store is None:
            raise RuntimeError("node stopped")
        return await store.submit(envelope, timeout)

    def _trace_for(self, command: SetPrimary) -> FailoverTrace:
        ft = self._traces.get(command.service)
        if ft is None:
            record = self.decider.running(command.service)
            service = self.node.state().service(command.service)
            started = time.time()
            if record is not None and record.started_unix is not None:
                started = record.started_unix
                down = self._down_since.get((command.service, record.old_primary or ""))
                if down is not None and record.kind == "failover":  # from the first failed probe
                    started = min(started, down + (record.started_unix - record.started_at))
            ft = self.node.tracing.start_failover(
                command.service,
                record.old_primary if record is not None else (service.primary if service else None),
                record.new_primary if record is not None else command.member,
                cause=record.cause if record is not None else command.cause,  # not the fence's "fence: ..."
                mode=record.mode if record is not None else "unknown",
                started_at=started,
            )
            self._traces[command.service] = ft
        return ft

    def _done(self, record: FailoverRecord) -> None:
        ft = self._traces.pop(record.service, None)
        if record.duration_ms is not None:
            self.node.metrics.observe_failover(record.service, record.duration_ms / 1000.0, record.mode)
        if ft is None:
            return
        times = {event.name: event.at for event in record.timeline}
        base_unix = record.started_unix if record.started_unix is not None else time.time()

        def unix(at: float) -> float:
            return base_unix + (at - record.started_at)

        def span(name: str, start: str | None, end: str, **attrs: Any) -> None:
            if end in times:
                begin = times.get(start, record.started_at) if start else record.started_at
                ft.record(name, unix(begin), unix(times[end]), **attrs)

        if "detected" in times:  # first failed probe (the trace's start) -> declared down
            ft.record(FailoverTrace.DETECTION, min(ft.started_at, unix(times["detected"])), unix(times["detected"]),
                      cause=record.cause)
        span(FailoverTrace.DECISION, "detected", "decided")
        span(FailoverTrace.COMMIT, "leadership_confirmed", "fenced", what="fail closed")
        span(FailoverTrace.PROMOTION, "proxies_fenced", "promoted", member=record.new_primary or "")
        span(FailoverTrace.COMMIT, "promoted" if "promoted" in times else "proxies_fenced", "committed", what="new primary")
        ft.set(epoch=record.epoch, new_primary=record.new_primary or "", status=record.status,
               write_unavailable_ms=record.write_unavailable_ms)
        ft.end(not_followed=record.missed_route, error=record.reason if record.status == "failed" else None)

    async def await_proxies(self, min_index: int, timeout: float) -> ProxyAcks:
        """Wait until every proxy of EVERY control-plane node holds a snapshot at or after
        `min_index` (each type it asked for synced), or `timeout` seconds passed. This node's
        proxies are read from its tracker; the other nodes' from their `GET /v1/proxies`
        (their addresses are in the replicated state). A node that does not answer counts as
        one proxy that did not follow (`<node>:unreachable`): its proxies keep their last
        config, which may still route to the old primary."""
        tracker = self.node.tracker
        deadline = time.monotonic() + timeout
        acked: dict[str, float] = {}
        remote = _RemoteProxies(self.node)
        try:
            while True:
                pending = []
                for record in tracker.connected():
                    key = f"{record.node.id}#{record.stream_id}"
                    if key in acked:
                        continue
                    if record.synced(min_index):
                        acked[key] = time.monotonic()
                    else:
                        pending.append(key)
                pending += await remote.pending(min_index, acked)
                if not pending or time.monotonic() >= deadline:
                    return ProxyAcks(acked=acked, missed=tuple(sorted(pending)))
                await asyncio.sleep(0.002)  # polling the tracker between ACKs
        finally:
            await remote.close()


class _RemoteProxies:
    """The other control-plane nodes' proxies, polled over their REST API during a failover."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.nodes = [n for n in node.state().nodes.values() if n.node_id != node.node_id]
        self.done: set[str] = set()
        self.session: Any = None

    async def pending(self, min_index: int, acked: dict[str, float]) -> list[str]:
        if not self.nodes:
            return []
        import aiohttp

        if self.session is None:
            headers = {}
            configured = self.node.settings.api.tokens
            tokens = (configured.read_only or configured.read_write) if configured is not None else ()
            if tokens:
                headers["Authorization"] = f"Bearer {tokens[0].get_secret_value()}"
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5), headers=headers)
        answers = await asyncio.gather(
            *(self._ask(n.node_id, n.api) for n in self.nodes if n.node_id not in self.done),
            return_exceptions=True,
        )
        pending: list[str] = []
        for node_id, answer in zip([n.node_id for n in self.nodes if n.node_id not in self.done], answers, strict=True):
            if isinstance(answer, BaseException):
                pending.append(f"{node_id}:unreachable")
                continue
            behind = 0
            for proxy in answer:
                if not proxy.get("connected"):
                    continue
                key = f"{node_id}/{proxy.get('node_id')}#{proxy.get('stream_id')}"
                if key in acked:
                    continue
                version = proxy.get("snapshot_version")
                if proxy.get("synced") and version is not None and int(version) >= min_index:
                    acked[key] = time.monotonic()
                else:
                    pending.append(key)
                    behind += 1
            if behind == 0:
                self.done.add(node_id)
        return pending

    async def _ask(self, node_id: str, api: str) -> list[dict[str, Any]]:
        async with self.session.get(f"http://{api}/v1/proxies") as resp:
            if resp.status != 200:
                raise RuntimeError(f"{node_id}: /v1/proxies answered {resp.status}")
            return list(await resp.json())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
