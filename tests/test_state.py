"""The replicated state machine: every rule, then random command sequences (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pydantic import ValidationError

from repstage_mesh.core.models import (
    Command,
    CommandEnvelope,
    DeleteService,
    Member,
    MeshState,
    Noop,
    PutService,
    ServiceSpec,
    SetPrimary,
)
from repstage_mesh.core.state import (
    apply,
    decode_command,
    decode_state,
    encode_command,
    encode_state,
    initial_state,
    replay,
)


def spec(
    name: str = "orders",
    members: tuple[str, ...] = ("a", "b"),
    listen_port: int = 15000,
    read_port: int | None = None,
    primary: str | None = None,
) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        listen_port=listen_port,
        read_port=read_port,
        members=tuple(
            Member(name=m, address="127.0.0.1", port=9000 + i) for i, m in enumerate(members)
        ),
        primary=primary,
    )


def state_with(*specs: ServiceSpec) -> MeshState:
    state, outcomes = replay(initial_state(specs))
    assert all(o.ok for o in outcomes)
    return state


# --- index bookkeeping ----------------------------------------------------------------------


def test_index_always_moves_and_last_change_only_on_change() -> None:
    state = state_with(spec())
    assert (state.index, state.last_change) == (1, 1)
    after, outcome = apply(state, Noop(term=2, node="cp-1"), 5)
    assert outcome.ok
    assert after.index == 5
    assert after.last_change == 1
    assert after.services == state.services


def test_index_must_grow() -> None:
    state = state_with(spec())
    with pytest.raises(ValueError, match="greater"):
        apply(state, Noop(), state.index)


# --- PutService ---------------------------------------------------------------------------


def test_put_new_service_without_primary() -> None:
    state, outcome = apply(MeshState(), PutService(spec=spec()), 3)
    svc = state.services["orders"]
    assert (svc.primary, svc.epoch, svc.changed_at) == (None, 0, 3)
    assert (state.index, state.last_change) == (3, 3)
    assert outcome.ok
    assert outcome.result["changed"] is True
    assert outcome.result["created"] is True
    assert outcome.result["previous_primary"] is None


def test_put_new_service_with_primary_takes_index_as_epoch() -> None:
    state, outcome = apply(MeshState(), PutService(spec=spec(primary="b")), 7)
    svc = state.services["orders"]
    assert (svc.primary, svc.epoch) == ("b", 7)
    assert outcome.result["primary"] == "b"
    assert outcome.result["epoch"] == 7


def test_replace_keeps_primary_and_epoch_while_primary_is_member() -> None:
    state = state_with(spec(primary="a"))
    state, outcome = apply(state, PutService(spec=spec(members=("a", "b", "c"), primary="a")), 10)
    svc = state.services["orders"]
    assert (svc.primary, svc.epoch, svc.changed_at) == ("a", 1, 10)
    assert len(svc.spec.members) == 3
    assert outcome.result["changed"] is True
    assert state.last_change == 10


def test_replace_ignores_spec_primary_while_current_primary_is_member() -> None:
    state = state_with(spec(primary="a"))
    state, _ = apply(state, PutService(spec=spec(primary="b", read_port=15001)), 4)
    assert (state.services["orders"].primary, state.services["orders"].epoch) == ("a", 1)


def test_replace_removing_primary_fails_closed_with_new_epoch() -> None:
    state = state_with(spec(members=("a", "b", "c"), primary="a"))
    state, outcome = apply(state, PutService(spec=spec(members=("b", "c"))), 8)
    svc = state.services["orders"]
    assert (svc.primary, svc.epoch) == (None, 8)
    assert outcome.result["previous_primary"] == "a"
    assert outcome.result["previous_epoch"] == 1


def test_replace_removing_primary_takes_spec_primary() -> None:
    state = state_with(spec(members=("a", "b", "c"), primary="a"))
    state, _ = apply(state, PutService(spec=spec(members=("b", "c"), primary="c")), 8)
    assert (state.services["orders"].primary, state.services["orders"].epoch) == ("c", 8)


def test_replace_when_no_primary_known_takes_spec_primary() -> None:
    state = state_with(spec())
    state, _ = apply(state, PutService(spec=spec(primary="b")), 6)
    assert (state.services["orders"].primary, state.services["orders"].epoch) == ("b", 6)


def test_replace_with_identical_spec_changes_nothing() -> None:
    state = state_with(spec(primary="a"))
    state, _ = apply(state, SetPrimary(service="orders", member="b"), 2)
    after, outcome = apply(state, PutService(spec=spec(primary="a")), 3)
    assert outcome.ok
    assert outcome.result["changed"] is False
    assert after.services == state.services
    assert (after.index, after.last_change) == (3, 2)
    assert after.services["orders"].primary == "b"


@pytest.mark.parametrize(
    ("new", "field"),
    [
        (spec(name="billing", listen_port=15000), "listen_port"),
        (spec(name="billing", listen_port=15001), "listen_port"),
        (spec(name="billing", listen_port=16000, read_port=15001), "read_port"),
        (spec(name="billing", listen_port=16000, read_port=15000), "read_port"),
    ],
)
def test_put_rejects_ports_of_another_service(new: ServiceSpec, field: str) -> None:
    state = state_with(spec(read_port=15001))
    after, outcome = apply(state, PutService(spec=new), 2)
    assert not outcome.ok
    assert outcome.rejection is not None
    assert outcome.rejection.code == "conflict"
    assert outcome.rejection.field == field
    assert "orders" in outcome.rejection.message
    assert after == state.model_copy(update={"index": 2})


def test_put_may_move_its_own_ports() -> None:
    state = state_with(spec(read_port=15001))
    state, outcome = apply(state, PutService(spec=spec(listen_port=15001, read_port=15000)), 2)
    assert outcome.ok
    assert state.services["orders"].spec.listen_port == 15001


# --- DeleteService ------------------------------------------------------------------------


def test_delete_service() -> None:
    state = state_with(spec(primary="a"), spec(name="billing", listen_port=16000))
    state, outcome = apply(state, DeleteService(name="orders"), 3)
    assert outcome.ok
    assert list(state.services) == ["billing"]
    assert state.last_change == 3


def test_delete_unknown_is_not_found() -> None:
    state = state_with(spec())
    after, outcome = apply(state, DeleteService(name="nope"), 2)
    assert outcome.rejection is not None
    assert (outcome.rejection.code, outcome.rejection.field) == ("not_found", "name")
    assert after == state.model_copy(update={"index": 2})


# --- SetPrimary ---------------------------------------------------------------------------


def test_set_primary_takes_index_as_epoch() -> None:
    state = state_with(spec(primary="a"))
    state, outcome = apply(state, SetPrimary(service="orders", member="b", cause="probe"), 4)
    svc = state.services["orders"]
    assert (svc.primary, svc.epoch, svc.changed_at) == ("b", 4, 4)
    assert outcome.result == {
        "service": "orders",
        "primary": "b",
        "epoch": 4,
        "changed": True,
        "previous_primary": "a",
        "previous_epoch": 1,
        "cause": "probe",
    }


def test_set_primary_none_fails_closed() -> None:
    state = state_with(spec(primary="a"))
    state, _ = apply(state, SetPrimary(service="orders", member=None), 2)
    assert (state.services["orders"].primary, state.services["orders"].epoch) == (None, 2)


def test_set_primary_unknown_service() -> None:
    state = state_with(spec())
    after, outcome = apply(state, SetPrimary(service="nope", member="a"), 2)
    assert outcome.rejection is not None
    assert (outcome.rejection.code, outcome.rejection.field) == ("not_found", "service")
    assert after == state.model_copy(update={"index": 2})


def test_set_primary_unknown_member() -> None:
    state = state_with(spec())
    after, outcome = apply(state, SetPrimary(service="orders", member="zz"), 2)
    assert outcome.rejection is not None
    assert (outcome.rejection.code, outcome.rejection.field) == ("not_found", "member")
    assert after == state.model_copy(update={"index": 2})


@pytest.mark.parametrize("claimed", [1, 5, 3])
def test_set_primary_stale_epoch(claimed: int) -> None:
    state, _ = replay([PutService(spec=spec(primary="a")), Noop(), Noop(), Noop()])
    state, _ = apply(state, SetPrimary(service="orders", member="a", epoch=99), 5)  # epoch -> 5
    assert state.services["orders"].epoch == 5
    after, outcome = apply(state, SetPrimary(service="orders", member="b", epoch=claimed), 6)
    assert outcome.rejection is not None
    assert (outcome.rejection.code, outcome.rejection.field) == ("stale_epoch", "epoch")
    assert "current epoch" in outcome.rejection.message
    assert "5" in outcome.rejection.message
    assert "6" in outcome.rejection.message  # the suggested current + 1
    assert after == state.model_copy(update={"index": 6})


def test_set_primary_greater_epoch_is_accepted_and_committed_as_index() -> None:
    state = state_with(spec(primary="a"))
    state, outcome = apply(state, SetPrimary(service="orders", member="b", epoch=2), 9)
    assert outcome.ok
    assert state.services["orders"].epoch == 9


def test_set_primary_same_member_without_epoch_is_idempotent() -> None:
    state = state_with(spec(primary="a"))
    after, outcome = apply(state, SetPrimary(service="orders", member="a"), 2)
    assert outcome.ok
    assert outcome.result["changed"] is False
    assert outcome.result["epoch"] == 1
    assert after == state.model_copy(update={"index": 2})


def test_set_primary_same_member_with_epoch_renews_the_epoch() -> None:
    state = state_with(spec(primary="a"))
    after, outcome = apply(state, SetPrimary(service="orders", member="a", epoch=2), 2)
    assert outcome.result["changed"] is True
    assert after.services["orders"].epoch == 2


# --- serialisation ------------------------------------------------------------------------


def test_command_round_trip() -> None:
    commands: list[Command] = [
        PutService(spec=spec(primary="a", read_port=15001)),
        DeleteService(name="orders"),
        SetPrimary(
            service="orders", member=None, epoch=3, cause="probe", trace={"traceparent": "00-x"}
        ),
        Noop(term=4, node="cp-2"),
    ]
    for command in commands:
        envelope = CommandEnvelope(command=command, request_id="r-1")
        assert decode_command(encode_command(envelope)) == envelope


def test_decode_rejects_garbage() -> None:
    with pytest.raises(ValidationError):
        decode_command(b'{"command": {"kind": "launch_missiles"}}')
    with pytest.raises(ValidationError):
        decode_state(b"not json")


def test_state_bytes_do_not_depend_on_dict_order() -> None:
    state, _ = replay(
        [PutService(spec=spec()), PutService(spec=spec(name="billing", listen_port=16000))]
    )
    assert list(state.services) == ["billing", "orders"]
    reordered = state.model_copy(update={"services": dict(reversed(state.services.items()))})
    assert list(reordered.services) == ["orders", "billing"]
    assert reordered == state
    assert encode_state(reordered) == encode_state(state)
    assert decode_state(encode_state(state)) == state


# --- random sequences ---------------------------------------------------------------------

NAMES = ("orders", "billing", "cache")
MEMBERS = ("a", "b", "c", "d")
PORTS = (15000, 15001, 15002, 15003, 15004)


@st.composite
def specs(draw: st.DrawFn) -> ServiceSpec:
    members = draw(st.lists(st.sampled_from(MEMBERS), min_size=1, max_size=4, unique=True))
    listen = draw(st.sampled_from(PORTS))
    read = draw(st.none() | st.sampled_from([p for p in PORTS if p != listen]))
    primary = draw(st.none() | st.sampled_from(members))
    return spec(draw(st.sampled_from(NAMES)), tuple(members), listen, read, primary)


commands = st.one_of(
    specs().map(lambda s: PutService(spec=s)),
    st.sampled_from(NAMES).map(lambda n: DeleteService(name=n)),
    st.builds(
        SetPrimary,
        service=st.sampled_from((*NAMES, "ghost")),
        member=st.none() | st.sampled_from((*MEMBERS, "zz")),
        epoch=st.none() | st.integers(min_value=1, max_value=60),
    ),
    st.builds(Noop, term=st.integers(0, 5), node=st.sampled_from(("", "cp-1"))),
)


class MeshMachine(RuleBasedStateMachine):
    """Applies random commands and checks the invariants after every one."""

    def __init__(self) -> None:
        super().__init__()
        self.state = MeshState()
        self.history: list[tuple[Command, int]] = []
        self.last_epochs: dict[str, int] = {}
        self.primary_at: dict[tuple[str, int], str | None] = {}

    @rule(command=commands, gap=st.integers(min_value=1, max_value=3))
    def apply_command(self, command: Command, gap: int) -> None:
        before = self.state
        index = before.index + gap
        after, outcome = apply(before, command, index)
        self.history.append((command, index))

        assert after.index == index
        if not outcome.ok:
            assert outcome.rejection is not None
            assert after == before.model_copy(update={"index": index})
        elif outcome.result.get("changed"):
            assert after.last_change == index
        else:
            assert after.services == before.services
            assert after.last_change == before.last_change

        for name, svc in after.services.items():
            old = before.services.get(name)
            if old is not None and svc != old:
                assert svc.changed_at == index
            if old is not None and svc.epoch != old.epoch:
                assert svc.epoch == index
            # Epochs never decrease while a service exists (a re-created service starts over).
            if name in before.services:
                assert svc.epoch >= self.last_epochs.get(name, 0)
            self.last_epochs[name] = svc.epoch
            # One primary per service per epoch, across the whole history.
            assert self.primary_at.setdefault((name, svc.epoch), svc.primary) == svc.primary
        for name in list(self.last_epochs):
            if name not in after.services:
                del self.last_epochs[name]
        self.state = after

    @invariant()
    def primary_is_a_member_or_none(self) -> None:
        for svc in self.state.services.values():
            assert svc.primary is None or svc.spec.member(svc.primary) is not None
            assert svc.epoch <= self.state.index
            assert svc.changed_at <= self.state.last_change <= self.state.index

    @invariant()
    def ports_are_unique(self) -> None:
        ports = [
            p
            for s in self.state.services.values()
            for p in (s.spec.listen_port, s.spec.read_port)
            if p
        ]
        assert len(ports) == len(set(ports))

    @invariant()
    def deterministic_and_round_trips(self) -> None:
        again = MeshState()
        for command, index in self.history:
            again, _ = apply(again, command, index)
        assert again == self.state
        data = encode_state(self.state)
        assert encode_state(again) == data
        assert decode_state(data) == self.state


MeshMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestMeshMachine = MeshMachine.TestCase


@given(command=commands, request_id=st.text(max_size=20))
@settings(max_examples=100, deadline=None)
def test_any_command_round_trips(command: Command, request_id: str) -> None:
    envelope = CommandEnvelope(command=command, request_id=request_id)
    assert decode_command(encode_command(envelope)) == envelope


def test_node_addresses_survive_every_other_command() -> None:
    """A service change must not drop what AnnounceNode recorded (a state rebuilt from its
    services alone once lost every node address, and with it the leader's view of the
    followers' proxies during break-before-make)."""
    from repstage_mesh.core.models import (
        AnnounceNode,
        Member,
        NodeAddress,
        PutService,
        ServiceSpec,
        SetPrimary,
    )

    spec = ServiceSpec(name="s", listen_port=1000, members=(Member(name="a", address="127.0.0.1", port=1),
                                                              Member(name="b", address="127.0.0.1", port=2)))
    state, _ = apply(MeshState(), AnnounceNode(node=NodeAddress(node_id="cp-1", api="127.0.0.1:1")), 1)
    state, _ = apply(state, PutService(spec=spec), 2)
    state, _ = apply(state, SetPrimary(service="s", member="b"), 3)
    assert list(state.nodes) == ["cp-1"]
    assert state.last_change == 3


def test_a_journal_written_before_operator_hooks_still_loads_without_the_inline_hook() -> None:
    """Issue 13: an older entry with an inline hook or a password variable name is read back
    (nothing acknowledged is lost) without the part a request may no longer carry."""
    old = {
        "command": {"kind": "put_service", "spec": {
            "name": "cache", "protocol": "redis", "listen_port": 16000,
            "members": [{"name": "a", "address": "10.0.0.1", "port": 6379}],
            "leadership": {"source": "probe", "mode": "orchestrate",
                           "promote_hook": {"command": ["sh", "-c", "id"], "timeout": 5},
                           "probe": {"password_env": "REPSTAGE_RAFT__PASSWORD"}}}},
        "request_id": "r1",
    }
    envelope = decode_command(json.dumps(old).encode())
    assert isinstance(envelope.command, PutService)
    lead = envelope.command.spec.leadership
    assert lead.promote_hook is None and lead.probe.password_secret is None
    state, _ = replay([envelope.command])
    snapshot = json.loads(encode_state(state))
    snapshot["services"]["cache"]["spec"]["leadership"]["promote_hook"] = {"url": "http://x"}
    assert decode_state(json.dumps(snapshot).encode()) == state
    with pytest.raises(ValidationError):  # a request still gets the refusal
        ServiceSpec.model_validate(old["command"]["spec"])
