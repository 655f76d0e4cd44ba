"""The xDS stream protocol, driven without sockets: unit cases and a hypothesis state machine
that plays a simulated Envoy against SotwStream and DeltaStream.

The simulated Envoy applies responses the way Envoy does (CDS/LDS are the full state in SotW;
EDS/RDS only the named resources; Delta applies changes and removals), subscribes to the
endpoints and routes its clusters and listeners refer to, and NACKs any response holding a
resource whose bytes contain b"BAD" (keeping its last good config, as Envoy does).
"""

from __future__ import annotations

import copy
import os
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from repstage_mesh.xds import mirror
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, split_version
from repstage_mesh.xds.protocol import (
    Acked,
    Action,
    DeltaRequest,
    DeltaStream,
    Nacked,
    Send,
    SotwRequest,
    SotwStream,
    Stale,
)
from repstage_mesh.xds.sync_state import type_sync_state

TYPES = (res.CLUSTER, res.ENDPOINT, res.LISTENER, res.ROUTE)
WILDCARD_TYPES = (res.CLUSTER, res.LISTENER)


def item(type_url: str, name: str, salt: str, refs: tuple[res.Ref, ...] = ()) -> EncodedResource:
    body = f"{name}:{salt}:" + ",".join(sorted(n for _, n in refs))  # what it refers to is content
    return EncodedResource.from_bytes(type_url, name, body.encode(), refs)


@dataclass(frozen=True)
class World:
    """A small consistent config: listeners -> cluster or route; routes -> cluster; cluster -> CLA."""

    listeners: dict[str, tuple[str, str, str]]  # name -> (kind "tcp"/"http", target, salt)
    routes: dict[str, tuple[str, str]]  # name -> (cluster, salt)
    clusters: dict[str, str]  # name -> salt (CLA of the same name, same salt unless below)
    endpoints: dict[str, str] = field(default_factory=dict)  # CLA name -> its own salt (a failover)

    def snapshot(self, version: int) -> Snapshot:
        out: dict[str, dict[str, EncodedResource]] = {t: {} for t in TYPES}
        for name, salt in self.clusters.items():
            out[res.CLUSTER][name] = item(res.CLUSTER, name, salt, ((res.ENDPOINT, name),))
            out[res.ENDPOINT][name] = item(res.ENDPOINT, name, self.endpoints.get(name, salt))
        for name, (cluster, salt) in self.routes.items():
            out[res.ROUTE][name] = item(res.ROUTE, name, salt, ((res.CLUSTER, cluster),))
        for name, (kind, target, salt) in self.listeners.items():
            ref = (res.CLUSTER, target) if kind == "tcp" else (res.ROUTE, target)
            out[res.LISTENER][name] = item(res.LISTENER, name, salt, (ref,))
        snap = Snapshot(str(version), out)
        assert not snap.dangling_references()
        return snap


salts = st.sampled_from(["1", "2", "3", "BAD"])


@st.composite
def worlds(draw: st.DrawFn) -> World:
    clusters = draw(st.dictionaries(st.sampled_from(["c0", "c1", "c2", "c3"]), salts, min_size=1, max_size=4))
    cnames = sorted(clusters)
    routes = draw(
        st.dictionaries(st.sampled_from(["r0", "r1"]), st.tuples(st.sampled_from(cnames), salts), max_size=2)
    )
    targets = [("tcp", c) for c in cnames] + [("http", r) for r in sorted(routes)]
    listeners = draw(
        st.dictionaries(
            st.sampled_from(["l0", "l1", "l2"]),
            st.tuples(st.sampled_from(targets), salts).map(lambda t: (t[0][0], t[0][1], t[1])),
            max_size=3,
        )
    )
    # Endpoints that change alone (the common push, a failover): they refer to nothing, so only
    # their own type moves; found the "quiet" shortcut keeping a switch-and-back from going out.
    endpoints = draw(st.dictionaries(st.sampled_from(cnames), st.sampled_from(["A", "B"]), max_size=2))
    return World(listeners, routes, clusters, endpoints)


@dataclass
class FakeEnvoy:
    """What Envoy holds, per type, and what it asks for next."""

    delta: bool
    applied: dict[str, dict[str, EncodedResource]] = field(default_factory=lambda: {t: {} for t in TYPES})
    version: dict[str, str] = field(default_factory=lambda: dict.fromkeys(TYPES, ""))
    nonce: dict[str, str] = field(default_factory=lambda: dict.fromkeys(TYPES, ""))
    subscribed: dict[str, set[str]] = field(default_factory=lambda: {res.ENDPOINT: set(), res.ROUTE: set()})

    def wanted(self, type_url: str) -> set[str]:
        refs: set[str] = set()
        for t in TYPES:
            for r in self.applied[t].values():
                refs.update(n for (rt, n) in r.refs if rt == type_url)
        return refs

    def first_requests(self) -> list[SotwRequest | DeltaRequest]:
        if self.delta:
            return [DeltaRequest(t) for t in WILDCARD_TYPES]
        return [SotwRequest(t) for t in WILDCARD_TYPES]

    def apply(self, send: Send) -> list[SotwRequest | DeltaRequest]:
        t = send.type_url
        bad = any(b"BAD" in r.any_bytes for r in send.resources)
        if bad:
            error = "rejected: BAD resource"
            self.nonce[t] = send.nonce  # Envoy names the latest nonce it saw, applied or not
            if self.delta:
                return [DeltaRequest(t, response_nonce=send.nonce, error=error)]
            return [SotwRequest(t, self.version[t], send.nonce, tuple(sorted(self.subscribed.get(t, ()))), error)]
        if self.delta:
            for name in send.removed:
                self.applied[t].pop(name, None)
            for r in send.resources:
                self.applied[t][r.name] = r
        elif t in WILDCARD_TYPES:
            self.applied[t] = {r.name: r for r in send.resources}
        else:
            for r in send.resources:
                self.applied[t][r.name] = r
        self.version[t], self.nonce[t] = send.version, send.nonce
        out: list[SotwRequest | DeltaRequest] = []
        if self.delta:
            out.append(DeltaRequest(t, response_nonce=send.nonce))
        else:
            out.append(SotwRequest(t, send.version, send.nonce, tuple(sorted(self.subscribed.get(t, ())))))
        out.extend(self.resubscribe())
        return out

    def resubscribe(self) -> list[SotwRequest | DeltaRequest]:
        out: list[SotwRequest | DeltaRequest] = []
        for t in (res.ENDPOINT, res.ROUTE):
            want = self.wanted(t)
            have = self.subscribed[t]
            if want == have:
                continue
            gone = have - want
            for name in gone:
                self.applied[t].pop(name, None)  # Envoy drops what it no longer uses
            if self.delta:
                out.append(DeltaRequest(t, subscribe=tuple(sorted(want - have)), unsubscribe=tuple(sorted(gone))))
            else:
                out.append(SotwRequest(t, self.version[t], self.nonce[t], tuple(sorted(want))))
            self.subscribed[t] = set(want)
        return out


class ProtocolMachine(RuleBasedStateMachine):
    delta = False

    def __init__(self) -> None:
        super().__init__()
        self.stream: SotwStream | DeltaStream = DeltaStream() if self.delta else SotwStream()
        self.envoy = FakeEnvoy(self.delta)
        self.to_envoy: deque[Send] = deque()
        self.to_server: deque[SotwRequest | DeltaRequest] = deque(self.envoy.first_requests())
        self.version = 0
        self.nonces: set[str] = set()
        self.nacked: set[tuple[str, str]] = set()  # (type, digest or name:version)
        self.last_index: dict[str, int] = {}
        self.world: World | None = None
        self.before: World | None = None
        self.sent: dict[str, Send] = {}

    def _take(self, actions: list[Action]) -> None:
        sends = [a for a in actions if isinstance(a, Send)]
        order = [res.ADS_ORDER.index(s.type_url) for s in sends]
        assert order == sorted(order), "ADS order: clusters, endpoints, listeners, routes"
        for a in actions:
            if isinstance(a, Send):
                assert a.nonce not in self.nonces, "nonces are unique per stream"
                self.nonces.add(a.nonce)
                index = int(split_version(a.version)[0] if not self.delta else a.version)
                assert index >= self.last_index.get(a.type_url, -1), "versions never go backwards"
                self.last_index[a.type_url] = index
                for key in self._content_keys(a):
                    assert key not in self.nacked, f"re-sent NACKed content {key}"
                self.to_envoy.append(a)
                self.sent[a.nonce] = a
            elif isinstance(a, Nacked):
                # From the moment the server knows of the rejection, it must not send it again.
                self.nacked.update(self._content_keys(self.sent[a.nonce]))

    def _content_keys(self, send: Send) -> list[tuple[str, str]]:
        if self.delta:
            return [(send.type_url, f"{r.name}:{r.version}") for r in send.resources]
        return [(send.type_url, split_version(send.version)[1])]

    @rule(world=worlds())
    def new_snapshot(self, world: World) -> None:
        self.version += 1
        self.before, self.world = self.world, world
        snapshot = world.snapshot(self.version)
        shadow = self._shadow()
        actions = self.stream.update(snapshot)
        if shadow is not None:
            assert actions == shadow.update(snapshot), "a shortcut answered otherwise than the full sync"
        self._take(actions)

    @precondition(lambda self: self.before is not None)
    @rule()
    def back_to_the_world_before(self) -> None:
        """A flap: the config before the last one again (a failover, then a failback), often while
        the last one is still on its way."""
        assert self.before is not None
        self.new_snapshot(self.before)

    def _shadow(self) -> SotwStream | None:
        """A copy of a SotW stream without the hot-path shortcuts (`SotwStream.shortcuts`)."""
        if not isinstance(self.stream, SotwStream):
            return None
        shadow = copy.deepcopy(self.stream)
        shadow.shortcuts = False
        return shadow

    @precondition(lambda self: bool(self.to_envoy))
    @rule()
    def deliver_to_envoy(self) -> None:
        send = self.to_envoy.popleft()
        self.to_server.extend(self.envoy.apply(send))

    @precondition(lambda self: bool(self.to_server))
    @rule()
    def deliver_to_server(self) -> None:
        request = self.to_server.popleft()
        shadow = self._shadow()
        actions = self.stream.receive(request)  # type: ignore[arg-type]
        if shadow is not None:
            assert actions == shadow.receive(request), "a shortcut answered otherwise than the full sync"  # type: ignore[arg-type]
        for a in actions:
            if isinstance(a, (Acked, Nacked, Stale)):
                assert a.type_url == request.type_url
        self._take(actions)

    @invariant()
    def envoy_never_dangles(self) -> None:
        """Removals after additions: what Envoy's listeners and clusters refer to, it holds
        (for clusters: the cluster itself; endpoints and routes arrive after subscription)."""
        for lis in self.envoy.applied[res.LISTENER].values():
            for t, name in lis.refs:
                if t == res.CLUSTER:
                    assert name in self.envoy.applied[res.CLUSTER], f"listener {lis.name} lost cluster {name}"
        for route in self.envoy.applied[res.ROUTE].values():
            for _t, name in route.refs:
                assert name in self.envoy.applied[res.CLUSTER], f"route {route.name} lost cluster {name}"

    @invariant()
    def the_mirrored_sync_state_is_the_worked_out_one(self) -> None:
        """What a worker tells the node of each type (mirror.mirror_wire, memoised per type)
        is what `type_sync_state` works out from scratch, after every step."""
        if self.stream.kind != "sotw":
            return
        for type_url, state in self.stream.types.items():
            assert mirror._sotw_sync(self.stream, type_url, state, type_sync_state) == type_sync_state(
                self.stream, type_url
            ), f"{res.short_name(type_url)}: the memo is stale"

    def teardown(self) -> None:
        # Let the conversation settle, then everything referenced must have been sent.
        for _ in range(500):
            if self.to_envoy:
                self.deliver_to_envoy()
            elif self.to_server:
                self.deliver_to_server()
            else:
                break
        else:  # pragma: no cover
            raise AssertionError("the conversation did not settle")
        if self.world is None or self.stream.snapshot is None:
            return
        snap = self.stream.snapshot
        for t in TYPES:
            state = type_sync_state(self.stream, t)
            assert state in ("synced", "nacked", "idle"), f"{t} left {state}"
        nacked_types = {t for t, _ in self.nacked}
        for t in (res.ENDPOINT, res.ROUTE):
            if nacked_types:
                break
            for name in self.envoy.wanted(t):
                assert name in self.envoy.applied[t], f"{name} ({res.short_name(t)}) referenced but never sent"
                assert self.envoy.applied[t][name] == snap.get(t)[name]
        if not nacked_types:
            for t in WILDCARD_TYPES:
                assert self.envoy.applied[t] == dict(snap.get(t)), f"{res.short_name(t)} not converged"


class DeltaProtocolMachine(ProtocolMachine):
    delta = True


# `make soak` runs them longer (PROTOCOL_EXAMPLES=600, 40 steps): that is how the SotW gating
# findings of issue 17 were found (bench/RESULTS.md).
_settings = settings(
    max_examples=int(os.environ.get("PROTOCOL_EXAMPLES", "100")),
    stateful_step_count=int(os.environ.get("PROTOCOL_STEPS", "30")),
    deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
TestSotwProtocol = ProtocolMachine.TestCase
TestSotwProtocol.settings = _settings
TestDeltaProtocol = DeltaProtocolMachine.TestCase
TestDeltaProtocol.settings = _settings


# --- unit cases ------------------------------------------------------------------------------


def simple(version: int, salt: str = "1") -> Snapshot:
    return World({"l0": ("tcp", "c0", salt)}, {}, {"c0": salt}).snapshot(version)


def test_sotw_ack_then_no_resend_of_same_content() -> None:
    s = SotwStream(simple(1))
    [send] = s.receive(SotwRequest(res.CLUSTER))
    acts = s.receive(SotwRequest(res.CLUSTER, send.version, send.nonce))  # type: ignore[union-attr]
    assert acts == [Acked(res.CLUSTER, send.version, send.nonce)]  # type: ignore[union-attr]
    assert s.update(simple(2)) == []  # same content at a newer index: nothing to send


def test_sotw_nack_is_not_resent_and_newer_content_is() -> None:
    s = SotwStream(simple(1))
    [first] = s.receive(SotwRequest(res.CLUSTER))
    assert isinstance(first, Send)
    s.receive(SotwRequest(res.CLUSTER, first.version, first.nonce))
    [bad] = s.update(simple(2, "BAD"))
    assert isinstance(bad, Send)
    acts = s.receive(SotwRequest(res.CLUSTER, first.version, bad.nonce, error="no"))
    assert acts == [Nacked(res.CLUSTER, bad.version, bad.nonce, "no")]
    assert s.update(simple(3, "BAD")) == []  # same rejected content, newer index: held back
    assert type_sync_state(s, res.CLUSTER) == "nacked"
    [good] = s.update(simple(4, "2"))
    assert isinstance(good, Send) and good.version.startswith("4-")


def test_sotw_stale_nonce_is_ignored() -> None:
    s = SotwStream(simple(1))
    [a] = s.receive(SotwRequest(res.CLUSTER))
    [b] = s.update(simple(2, "2"))
    assert isinstance(a, Send) and isinstance(b, Send)
    assert s.receive(SotwRequest(res.CLUSTER, a.version, a.nonce)) == [Stale(res.CLUSTER, a.nonce)]


def test_sotw_reconnect_with_current_digest_gets_nothing_and_newer_client_is_not_downgraded() -> None:
    first = SotwStream(simple(5))
    [send] = first.receive(SotwRequest(res.CLUSTER))
    assert isinstance(send, Send)
    # Same content at another replica (same version): nothing to send.
    again = SotwStream(simple(5))
    assert again.receive(SotwRequest(res.CLUSTER, send.version)) == []
    assert type_sync_state(again, res.CLUSTER) == "synced"
    # A replica behind the client (index 3 < 5) with other content sends nothing until it catches up.
    behind = SotwStream(simple(3, "old"))
    assert behind.receive(SotwRequest(res.CLUSTER, send.version)) == []
    [later] = behind.update(simple(6, "new"))
    assert isinstance(later, Send) and later.version.startswith("6-")


def test_sotw_removed_cluster_kept_until_listener_update_acked() -> None:
    a = World({"l0": ("tcp", "c0", "1")}, {}, {"c0": "1"})
    b = World({"l0": ("tcp", "c1", "1")}, {}, {"c1": "1"})
    s = SotwStream(a.snapshot(1))
    acks: dict[str, Send] = {}
    for t in (res.CLUSTER, res.LISTENER):
        [send] = s.receive(SotwRequest(t))
        assert isinstance(send, Send)
        s.receive(SotwRequest(t, send.version, send.nonce))
        acks[t] = send
    [cds] = s.update(b.snapshot(2))
    assert isinstance(cds, Send)
    assert [r.name for r in cds.resources] == ["c0", "c1"]  # addition first, c0 kept
    # The listener moves to c1 only once c1 was ACKed.
    ack, lds = s.receive(SotwRequest(res.CLUSTER, cds.version, cds.nonce))
    assert ack == Acked(res.CLUSTER, cds.version, cds.nonce)
    assert isinstance(lds, Send) and lds.type_url == res.LISTENER
    acts = s.receive(SotwRequest(res.LISTENER, lds.version, lds.nonce))
    removal = [x for x in acts if isinstance(x, Send)]
    assert [r.name for r in removal[0].resources] == ["c1"]  # removal after the listener moved


def test_delta_initial_versions_skip_what_the_client_has() -> None:
    snap = simple(4)
    c0 = snap.get(res.CLUSTER)["c0"]
    s = DeltaStream(snap)
    assert s.receive(DeltaRequest(res.CLUSTER, initial_versions={"c0": c0.version})) == []
    acts = s.receive(DeltaRequest(res.LISTENER, initial_versions={"l0": "old", "gone": "x"}))
    [send] = acts
    assert isinstance(send, Send)
    assert [r.name for r in send.resources] == ["l0"] and send.removed == ("gone",)


def test_delta_nack_restores_and_is_not_resent() -> None:
    s = DeltaStream(simple(1))
    [send] = s.receive(DeltaRequest(res.CLUSTER))
    assert isinstance(send, Send)
    s.receive(DeltaRequest(res.CLUSTER, response_nonce=send.nonce))
    [bad] = s.update(simple(2, "BAD"))
    assert isinstance(bad, Send)
    acts = s.receive(DeltaRequest(res.CLUSTER, response_nonce=bad.nonce, error="bad"))
    assert acts == [Nacked(res.CLUSTER, "2", bad.nonce, "bad")]
    assert s.update(simple(3, "BAD")) == []
    assert type_sync_state(s, res.CLUSTER) == "nacked"


def test_sotw_a_superseded_response_the_client_may_hold_keeps_what_it_refers_to() -> None:
    """A listener response replaced (by one the client will NACK) before its ACK arrived: the
    client may hold the first, so the cluster it names is not removed until it answers (found
    by the state machine: "listener l0 lost cluster c0")."""
    s = SotwStream(World({"l0": ("tcp", "c0", "1")}, {}, {"c0": "1"}).snapshot(1))
    [cds] = s.receive(SotwRequest(res.CLUSTER))
    [empty] = s.receive(SotwRequest(res.LISTENER))
    assert isinstance(cds, Send) and isinstance(empty, Send)
    [lds] = s.receive(SotwRequest(res.CLUSTER, cds.version, cds.nonce))[1:]
    assert isinstance(lds, Send) and [r.name for r in lds.resources] == ["l0"]
    [bad] = s.update(World({"l0": ("http", "r0", "BAD")}, {"r0": ("c0", "1")}, {"c0": "1"}).snapshot(2))
    assert isinstance(bad, Send) and bad.type_url == res.LISTENER
    out = s.update(World({}, {}, {"c1": "1"}).snapshot(3))
    [cds3] = [a for a in out if isinstance(a, Send) and a.type_url == res.CLUSTER]
    assert {r.name for r in cds3.resources} == {"c0", "c1"}  # l0 -> c0 may be what the client holds
    s.receive(SotwRequest(res.LISTENER, empty.version, empty.nonce))  # stale ACKs, in order
    s.receive(SotwRequest(res.LISTENER, lds.version, lds.nonce))
    assert set(s.types[res.LISTENER].acked) == {"l0"}  # it said so: it holds l0 -> c0


def test_delta_nack_of_an_older_response_keeps_the_later_responses_view() -> None:
    """Two responses in flight, the first NACKed: the client holds what it confirmed plus the
    second response, not what the first would have given (found by the state machine: a
    listener was sent for a cluster the client never applied)."""
    both = World({}, {}, {"c0": "1", "c1": "1", "c2": "BAD"}).snapshot(1)
    s = DeltaStream(both)
    [first] = s.receive(DeltaRequest(res.CLUSTER))
    assert isinstance(first, Send)
    [second] = s.update(World({}, {}, {"c0": "BAD"}).snapshot(2))
    assert isinstance(second, Send) and set(second.removed) == {"c1", "c2"}
    s.receive(DeltaRequest(res.CLUSTER, response_nonce=first.nonce, error="c2 is bad"))
    state = s.types[res.CLUSTER]
    assert set(state.client_versions) == {"c0"}  # the second response's c0, in flight
    s.receive(DeltaRequest(res.CLUSTER, response_nonce=second.nonce, error="c0 is bad"))
    assert state.client_versions == {} and state.held == {}
    # A listener naming c1 now is held back: the client never applied c1.
    s.receive(DeltaRequest(res.LISTENER))
    out = s.update(World({"l0": ("tcp", "c1", "1")}, {}, {"c1": "1"}).snapshot(3))
    assert not any(isinstance(a, Send) and a.type_url == res.LISTENER and a.resources for a in out)


def test_delta_subscribed_missing_resource_is_reported_once() -> None:
    s = DeltaStream(simple(1))
    [send] = s.receive(DeltaRequest(res.ENDPOINT, subscribe=("c0", "nope")))
    assert isinstance(send, Send)
    assert [r.name for r in send.resources] == ["c0"] and send.removed == ("nope",)
    assert s.receive(DeltaRequest(res.ENDPOINT, response_nonce=send.nonce))[1:] == []


@pytest.mark.parametrize("stream_cls", [SotwStream, DeltaStream])
def test_request_without_type_url_is_a_protocol_error(stream_cls: type[SotwStream] | type[DeltaStream]) -> None:
    from repstage_mesh.xds.protocol import ProtocolError

    with pytest.raises(ProtocolError):
        stream_cls().receive(SotwRequest("") if stream_cls is SotwStream else DeltaRequest(""))  # type: ignore[arg-type]


def test_sotw_a_listener_is_held_while_the_clusters_in_flight_drop_its_cluster() -> None:
    """Found by the state machine: the client ACKed c0 long ago, a cluster update was NACKed,
    and clusters without c0 are in flight; a listener naming c0 must wait (a SotW response is
    the whole set: the one in flight removes c0), not go out on the strength of the old ACK."""
    machine = ProtocolMachine()
    machine.deliver_to_server()
    machine.new_snapshot(world=World(listeners={}, routes={}, clusters={"c0": "1"}))
    machine.new_snapshot(world=World(listeners={}, routes={}, clusters={"c1": "2", "c0": "3", "c2": "BAD", "c3": "3"}))
    for step in ("envoy", "envoy", "server", "envoy", "server", "server", "envoy"):
        getattr(machine, f"deliver_to_{step}")()
    machine.new_snapshot(world=World(listeners={}, routes={}, clusters={"c1": "1"}))
    machine.deliver_to_envoy()
    machine.deliver_to_server()  # the NACK of the bad update, now stale
    machine.new_snapshot(world=World(listeners={"l0": ("tcp", "c0", "1")}, routes={},
                                     clusters={"c1": "2", "c0": "3", "c2": "BAD", "c3": "3"}))
    assert not [s for s in machine.to_envoy if s.type_url == res.LISTENER], "l0 went out before c0 was confirmed"
    while machine.to_envoy or machine.to_server:
        if machine.to_envoy:
            machine.deliver_to_envoy()
        else:
            machine.deliver_to_server()
        machine.envoy_never_dangles()
    machine.teardown()


def _endpoints(version: int, primary: str) -> Snapshot:
    item = EncodedResource.from_bytes(res.ENDPOINT, "db", f"primary={primary}".encode())
    return Snapshot(str(version), {res.ENDPOINT: {"db": item}})


def test_sotw_a_switch_and_back_before_the_ack_sends_the_first_primary_again() -> None:
    """A failover and a failback (A, B, A) before Envoy ACKs B: A was once found to need
    nothing, but with B on its way it must go out again, or Envoy stays on B."""
    s = SotwStream(_endpoints(1, "A"))
    [first] = s.receive(SotwRequest(res.ENDPOINT, resource_names=("db",)))
    assert isinstance(first, Send)
    s.receive(SotwRequest(res.ENDPOINT, first.version, first.nonce, ("db",)))
    assert s.update(_endpoints(2, "A")) == []  # found quiet with A held
    [to_b] = s.update(_endpoints(3, "B"))
    assert isinstance(to_b, Send)
    [back] = s.update(_endpoints(4, "A"))
    assert isinstance(back, Send) and back.resources == first.resources
    assert s.receive(SotwRequest(res.ENDPOINT, to_b.version, to_b.nonce, ("db",))) == [Stale(res.ENDPOINT, to_b.nonce)]
    s.receive(SotwRequest(res.ENDPOINT, back.version, back.nonce, ("db",)))
    assert type_sync_state(s, res.ENDPOINT) == "synced"
