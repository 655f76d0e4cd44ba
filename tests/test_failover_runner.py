"""FailoverRunner with in-memory fakes: order of I/O, bounded steps, per-service serialisation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from repstage_mesh.core.errors import CommitTimeout, DecisionRefused, NoQuorum
from repstage_mesh.core.models import (
    CommandEnvelope,
    LeadershipMode,
    LeadershipSource,
    LeadershipSpec,
    Member,
    MeshState,
    Outcome,
    PutService,
    ServiceSpec,
    SetPrimary,
)
from repstage_mesh.core.observations import MemberStatus, Observation
from repstage_mesh.core.state import apply
from repstage_mesh.decide import (
    Decider,
    FailoverRecord,
    PromoteResult,
    ProxyAcks,
)
from repstage_mesh.failover.runner import FailoverRunner

P, R, D = MemberStatus.PRIMARY, MemberStatus.REPLICA, MemberStatus.DOWN


HOOK_TIMEOUTS: dict[str, float] = {}  # the operator's hooks (config hooks:), by name


def spec(name: str = "cache", port: int = 6379, hook_timeout: float | None = None) -> ServiceSpec:
    members = tuple(Member(name=n, address="127.0.0.1", port=port + 1 + i) for i, n in enumerate("abc"))
    hook = f"hook-{hook_timeout:g}".replace(".", "-") if hook_timeout else None
    if hook_timeout:
        HOOK_TIMEOUTS[hook] = hook_timeout
    return ServiceSpec(
        name=name, listen_port=port, members=members, primary="a",
        leadership=LeadershipSpec(source=LeadershipSource.PROBE, mode=LeadershipMode.ORCHESTRATE,
                                  ack_deadline=0.5, promote_hook=hook),
    )


@dataclass
class Fakes:
    """A store applying commands with the real state machine, proxies that ACK, a promoter."""

    runner: FailoverRunner = field(init=False)
    state: MeshState = field(default_factory=MeshState)
    calls: list[tuple[str, object]] = field(default_factory=list)
    leader: bool = True
    submit_error: Exception | None = None
    promote_hang: set[str] = field(default_factory=set)
    promote_fail: set[str] = field(default_factory=set)
    ack_delay: float = 0.0
    busy: dict[str, int] = field(default_factory=dict)
    max_busy: dict[str, int] = field(default_factory=dict)
    done: list[FailoverRecord] = field(default_factory=list)
    roles: dict[str, MemberStatus] = field(default_factory=lambda: {"a": P, "b": R, "c": R})

    def __post_init__(self) -> None:
        self.runner = FailoverRunner(
            Decider("n1", settle=0.0), self.submit, self.confirm, self.await_proxies, self,
            time.monotonic, commit_timeout=1.0, confirm_timeout=0.5, promote_timeout=0.3,
            grace=0.1, on_done=self.done.append,
        )

    def put(self, s: ServiceSpec) -> None:
        self._apply(PutService(spec=s))

    def _apply(self, command: PutService | SetPrimary) -> Outcome:
        self.state, outcome = apply(self.state, command, self.state.index + 1)
        self.runner.on_state(self.state)
        return outcome

    def _enter(self, service: str) -> None:
        self.busy[service] = self.busy.get(service, 0) + 1
        self.max_busy[service] = max(self.max_busy.get(service, 0), self.busy[service])

    def _leave(self, service: str) -> None:
        self.busy[service] -= 1

    async def submit(self, envelope: CommandEnvelope, timeout: float) -> Outcome:
        assert isinstance(envelope.command, SetPrimary)
        self.calls.append(("submit", envelope.command.member))
        if self.submit_error is not None:
            raise self.submit_error
        return self._apply(envelope.command)

    async def confirm(self, timeout: float) -> bool:
        self.calls.append(("confirm", self.leader))
        return self.leader

    async def await_proxies(self, min_index: int, deadline: float) -> ProxyAcks:
        self.calls.append(("await", min_index))
        assert self.state.index >= min_index
        if self.ack_delay:
            await asyncio.sleep(self.ack_delay)  # a slow proxy, not synchronisation
        return ProxyAcks({"envoy-1": time.monotonic()})

    def hook_timeout(self, spec: ServiceSpec) -> float | None:
        hook = spec.leadership.promote_hook
        return HOOK_TIMEOUTS.get(hook) if hook is not None else None

    async def promote(self, spec: ServiceSpec, member: str, old: str | None, epoch: int,
                      timeout: float) -> PromoteResult:
        self._enter(spec.name)
        try:
            self.calls.append(("promote", member))
            if member in self.promote_hang:
                await asyncio.Event().wait()
            if member in self.promote_fail:
                return PromoteResult(False, detail="fake")
            others = tuple(n for n in self.roles if n != member)
            self.roles = {n: (P if n == member else R) for n in self.roles}
            return PromoteResult(True, detail="fake", repointed=others)
        finally:
            self._leave(spec.name)

    async def repoint(self, spec: ServiceSpec, member: str, new: str, timeout: float) -> PromoteResult:
        self._enter(spec.name)
        try:
            self.calls.append(("repoint", member))
            return PromoteResult(True, repointed=(member,))
        finally:
            self._leave(spec.name)

    async def positions(self, spec: ServiceSpec, members: Sequence[str], timeout: float) -> dict[str, int | None]:
        self.calls.append(("positions", tuple(members)))
        return {m: 100 for m in members}

    def see(self, member: str, status: MemberStatus, offset: int | None = None, service: str = "cache") -> None:
        self.runner.observe(Observation(service, member, status, time.monotonic(), "probe", "", offset))

    def healthy(self, service: str = "cache", offsets: tuple[int, int, int] = (100, 90, 95)) -> None:
        for name, status, offset in zip("abc", (P, R, R), offsets, strict=True):
            self.see(name, status, offset, service)

    def primary(self, service: str = "cache") -> str | None:
        svc = self.state.service(service)
        assert svc is not None
        return svc.primary


async def test_orchestrated_failover_runs_steps_in_order() -> None:
    f = Fakes()
    f.put(spec())
    f.healthy()
    f.see("a", D)
    await f.runner.idle()
    fence_index = f.state.index - 1
    assert f.calls == [
        ("confirm", True), ("submit", None), ("await", fence_index), ("promote", "c"),
        ("submit", "c"), ("await", f.state.index),
    ]
    assert f.primary() == "c"
    assert [r.status for r in f.done] == ["done"]


async def test_no_commit_when_leadership_is_not_confirmed() -> None:
    f = Fakes(leader=False)
    f.put(spec())
    f.healthy()
    f.see("a", D)
    await f.runner.idle()
    assert f.calls == [("confirm", False)] and f.primary() == "a"
    assert f.done[0].status == "failed"


async def test_a_hanging_promotion_is_bounded_and_the_next_candidate_is_tried() -> None:
    f = Fakes()
    f.put(spec(hook_timeout=0.2))
    f.promote_hang.add("c")
    f.healthy()
    started = time.monotonic()
    f.see("a", D)
    await f.runner.idle(timeout=5.0)
    assert time.monotonic() - started < 2.0
    assert [c for c in f.calls if c[0] == "promote"] == [("promote", "c"), ("promote", "b")]
    assert f.primary() == "b"


@pytest.mark.parametrize(
    ("error", "unknown"), [(NoQuorum("no majority"), False), (CommitTimeout("unknown"), True)]
)
async def test_commit_errors_end_the_plan(error: Exception, unknown: bool) -> None:
    f = Fakes(submit_error=error)
    f.put(spec())
    f.healthy()
    f.see("a", D)
    await f.runner.idle()
    assert [c for c in f.calls if c[0] == "submit"] == [("submit", None)]
    assert f.done[0].status == "failed" and str(error) in f.done[0].reason
    assert f.primary() == "a"


async def test_steps_of_one_service_are_serialised_and_services_run_in_parallel() -> None:
    f = Fakes(ack_delay=1.0)
    f.put(spec("one", 6000))
    f.put(spec("two", 7000))
    for svc in ("one", "two"):
        f.healthy(svc)
    started = time.monotonic()
    f.see("a", D, service="one")
    f.see("a", D, service="two")
    await f.runner.idle()
    # two plans, each with two ACK waits of 1 s: in parallel ~2 s, serially ~4 s
    assert time.monotonic() - started < 3.5
    assert f.primary("one") == "c" and f.primary("two") == "c"
    # the old primary comes back while a slow plan is still running: Repoint waits its turn
    f.see("c", P, 100, "one")
    f.see("a", P, 100, "one")
    await f.runner.idle()
    assert ("repoint", "a") in f.calls
    assert f.max_busy.get("one", 0) <= 1


async def test_switchover_through_the_runner_reports_the_unavailable_window() -> None:
    f = Fakes()
    f.put(spec())
    f.healthy(offsets=(100, 100, 90))
    f.runner.start(interval=0.01)
    try:
        record = await f.runner.switchover("cache", "b", timeout=2.0)
    finally:
        await f.runner.close()
    assert record.status == "done", record.reason
    assert f.primary() == "b"
    assert record.write_unavailable_ms is not None and record.write_unavailable_ms < 1000
    with pytest.raises(DecisionRefused):
        await f.runner.switchover("cache", "b")


async def test_a_switchover_that_outlives_its_wait_returns_running_and_goes_on() -> None:
    f = Fakes(ack_delay=0.5)
    f.put(spec())
    f.healthy(offsets=(100, 100, 90))
    f.runner.start(interval=0.01)
    try:
        record = await f.runner.switchover("cache", "b", timeout=2.0, wait=0.05)
        assert record.status == "running"  # the answer comes after `wait`, not a TimeoutError
        await f.runner.idle()
        final = f.runner.decider.record(record.id)
    finally:
        await f.runner.close()
    assert final is not None and final.status == "done", final
    assert f.primary() == "b"


async def test_close_abandons_a_running_plan() -> None:
    f = Fakes(ack_delay=5.0)
    f.put(spec())
    f.healthy()
    f.see("a", D)
    deadline = time.monotonic() + 2.0
    while ("await", f.state.index) not in f.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # poll for the condition with a deadline
    await f.runner.close("leadership lost")
    assert f.done and f.done[-1].status == "failed" and "leadership lost" in f.done[-1].reason
    assert f.runner.decider.running("cache") is None
    assert f.primary() is None  # the fence stays committed: fail closed


async def test_a_switchover_names_who_asked_in_its_cause_and_the_audit_trail() -> None:
    f = Fakes()
    f.put(spec())
    f.healthy(offsets=(100, 100, 90))
    f.runner.start(interval=0.01)
    try:
        record = await f.runner.switchover("cache", "b", timeout=2.0,
                                           cause="planned switchover requested by ci-deploy")
    finally:
        await f.runner.close()
    assert record.status == "done", record.reason
    assert "ci-deploy" in record.cause
    routed = [e for e in f.state.audit if e.action == "set_primary" and "primary b" in e.detail]
    assert routed and "requested by ci-deploy" in routed[-1].detail
