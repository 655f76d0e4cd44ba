"""The xDS stream protocol as a state machine with no I/O (h11 style).

One `SotwStream` or `DeltaStream` per gRPC stream. Feed it what the client said
(`receive(request)`) and what the cache holds (`update(snapshot)`); it returns actions: `Send`
a response, and the `Acked` / `Nacked` / `Stale` facts the proxy tracker records (the server's
transports move the bytes; the tests drive it with hypothesis, without sockets).

What it guarantees (each is a property test in tests/test_xds_protocol.py):
- nonces are unique per stream;
- a NACKed content is never sent again to that stream (Envoy keeps its last good config);
- versions never go backwards on a stream, and a client coming back with a newer version than
  this replica holds is not sent anything older;
- ADS ordering: clusters, endpoints, listeners, routes; a cluster (or endpoint, or route) that a
  listener or cluster the client holds still refers to is kept until the referring resource has
  been replaced and ACKed, so removals go out after the additions;
- every route/endpoint name a sent listener or cluster refers to is sent when subscribed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from . import resources as res
from .cache import EncodedResource, Selection, Snapshot, set_digest, split_version
from .messages import (
    Acked,
    Action,
    DeltaRequest,
    Nacked,
    NodeInfo,
    ProtocolError,
    Send,
    SotwRequest,
    Stale,
)

__all__ = ["Acked", "Action", "DeltaRequest", "DeltaStream", "Nacked", "NodeInfo", "ProtocolError", "Send", "SotwRequest", "SotwStream", "Stale"]

# --- shared machinery ------------------------------------------------------------------------

_NONE: frozenset[str] = frozenset()  # one empty set for every stream's types (memory per stream)


@dataclass(slots=True)
class _Pending:
    nonce: str
    version: str
    resources: Mapping[str, EncodedResource]  # SotW: the full set sent (shared, read-only); Delta: the updated ones
    removed: tuple[str, ...] = ()
    digest: str = ""  # SotW: the set digest in `version`


@dataclass(slots=True)
class _TypeState:
    requested: bool = False
    wildcard: bool = False
    names: AbstractSet[str] = _NONE  # replaced, never changed in place (as the others below)
    names_key: frozenset[str] = frozenset()  # SotW: `names`, frozen (the snapshot's memo key)
    acked: Mapping[str, EncodedResource] = field(default_factory=dict)  # read-only: replaced, never changed
    acked_version: str = ""
    acked_digest: str = ""  # SotW: the digest in `acked_version`
    quiet: tuple[str, int] | None = None  # SotW: (selection digest, generation) that sent nothing
    pending: dict[str, _Pending] = field(default_factory=dict)  # by nonce
    last_nonce: str = ""
    nacked: AbstractSet[str] = _NONE  # SotW: set digests; Delta: "name:digest"
    floor: int = -1  # SotW: index of the version the client came back with
    client_digest: str = ""  # SotW: digest of the version the client came back with
    held: dict[str, EncodedResource] = field(default_factory=dict)  # Delta: what the client has
    client_versions: dict[str, str] = field(default_factory=dict)  # Delta: name -> version
    told_missing: AbstractSet[str] = _NONE  # Delta
    sent: dict[str, str] = field(default_factory=dict)  # SotW: recent nonce -> version
    known_versions: dict[str, str] = field(default_factory=dict)  # Delta: what the client confirmed
    # SotW: responses replaced by a newer one before the client answered them: it may have
    # applied any of them, so what they refer to is kept until it answers a later one.
    superseded: dict[str, Mapping[str, EncodedResource]] = field(default_factory=dict)
    asked_again: bool = False  # SotW: a request that is not an ACK: answer it even if unchanged
    sync_memo: tuple[object, ...] | None = None  # SotW: mirror._sotw_sync's last answer and its key
    selection_memo: tuple[object, ...] | None = None  # (snapshot, names key, its Selection): _Stream._selection


class _Stream:
    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self.snapshot = snapshot
        self.node: NodeInfo | None = None
        self.types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        # SotW: bumped by every change to what this stream knows of its client (a request
        # other than a plain ACK, a response sent), so a type found quiet need not be looked
        # at again until either its selection or the stream changes (`_TypeState.quiet`).
        self.generation = 0

    def _next_nonce(self) -> str:
        return str(next(self._nonces))

    def _type(self, type_url: str) -> _TypeState:
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = _TypeState()
        return state

    def _begin(self, request: SotwRequest | DeltaRequest) -> _TypeState:
        """What every request does first: note the node (sent once), check the type."""
        if request.node is not None and self.node is None:
            self.node = request.node
        if not request.type_url:
            raise ProtocolError("request without type_url")
        return self._type(request.type_url)

    def update(self, snapshot: Snapshot) -> list[Action]:
        """The cache has a new snapshot for this stream's group."""
        if self.snapshot is not None and snapshot.index < self.snapshot.index:
            return []  # never go backwards
        self.snapshot = snapshot
        return self._sync()

    def _order(self) -> list[str]:
        order = self.snapshot.order if self.snapshot is not None else res.ADS_ORDER
        extra = sorted(t for t in self.types if t not in order)
        return [t for t in (*order, *extra) if t in self.types]

    def _sync(self) -> list[Action]:
        if self.snapshot is None:
            return []
        actions: list[Action] = []
        for type_url in self._order():
            action = self._compute(type_url)
            if action is not None:
                actions.append(action)
        return actions

    def _compute(self, type_url: str) -> Send | None:
        raise NotImplementedError

    def renew(self) -> list[Action]:
        """Send the leased resources (those with a TTL) again, so Envoy keeps them another TTL.

        Only a client that holds everything this replica would send now is renewed: one with a
        response in flight (that response renews), behind, or that NACKed something (it keeps
        an older config, which may route to a demoted primary: left to expire) is not."""
        if self.snapshot is None:
            return []
        from .sync_state import type_sync_state  # it reads the streams' state: imported when used

        if any(type_sync_state(self, type_url) not in ("synced", "idle") for type_url in self.types):
            return []  # the client lacks something newer (or refused it): let its lease run out
        actions: list[Action] = []
        for type_url in self._order():
            state = self.types[type_url]
            if state.requested and not state.pending and self.snapshot.index >= state.floor:
                action = self._renewal(type_url, state)
                if action is not None:
                    actions.append(action)
        return actions

    def _renewal(self, type_url: str, state: _TypeState) -> Send | None:
        raise NotImplementedError

    def _held_resources(self, state: _TypeState) -> Iterable[EncodedResource]:
        raise NotImplementedError

    def _referenced(self) -> set[res.Ref]:
        """Everything some resource the client holds, or is being sent, refers to."""
        refs: set[res.Ref] = set()
        for state in self.types.values():
            for item in self._held_resources(state):
                refs.update(item.refs)
        return refs

    def _names_key(self, state: _TypeState) -> frozenset[str]:
        return frozenset(state.names)

    def _selection(self, type_url: str, state: _TypeState) -> Selection:
        snapshot, names, memo = self.snapshot, None if state.wildcard else self._names_key(state), state.selection_memo
        assert snapshot is not None  # the memo: a push reads the selection several times
        if memo is not None and memo[0] is snapshot and memo[1] is names:
            return memo[2]  # type: ignore[return-value]
        state.selection_memo = (snapshot, names, found := snapshot.selection(type_url, names))
        return found

    def _desired(self, type_url: str, state: _TypeState) -> Mapping[str, EncodedResource]:
        """What the client should hold of `type_url`. Read-only: when nothing is kept or held
        back for this client it is the snapshot's shared `Selection.resources` itself."""
        assert self.snapshot is not None
        current = self.snapshot.get(type_url)
        desired: Mapping[str, EncodedResource] = self._selection(type_url, state).resources
        # Keep what the client holds and still needs: a resource gone from the snapshot that a
        # held listener, route or cluster still refers to stays until that referrer is gone.
        referenced = None
        kept: dict[str, EncodedResource] | None = None
        for item in self._held_resources(state):
            if item.name in desired or item.name in current:
                continue
            if not state.wildcard and item.name not in state.names:
                continue
            if referenced is None:
                referenced = self._referenced()
            if (type_url, item.name) in referenced:
                if kept is None:
                    kept = dict(desired)
                kept[item.name] = item
        if kept is not None:
            desired = kept
        if type_url in _GATED:
            desired = self._gate(state, desired)
        return desired

    def _gate(self, state: _TypeState, desired: Mapping[str, EncodedResource]) -> Mapping[str, EncodedResource]:
        """A listener or route goes out only once the clusters it names were ACKed by the
        client: if the cluster update is NACKed, the client keeps a consistent older config
        instead of a listener pointing at nothing. Held back, the client keeps its version.
        Returns `desired` itself when nothing is held back, a changed copy otherwise."""
        out: dict[str, EncodedResource] | None = None
        for name, item in desired.items():
            if all(self._confirmed(ref_type, ref_name) for ref_type, ref_name in item.refs if ref_type == res.CLUSTER):
                continue
            if out is None:
                out = dict(desired)
            older = self._client_copy(state, name)
            if older is not None:
                out[name] = older
            else:
                del out[name]
        return desired if out is None else out

    def _confirmed(self, type_url: str, name: str) -> bool:
        state = self.types.get(type_url)
        if state is None or not state.requested:
            return True  # the client does not get this type from us: nothing to wait for
        if self._in_flight(state, name):
            return False  # whatever the client has now may change with the response in flight
        return name in state.acked or self._confirmed_otherwise(state, name)

    def _in_flight(self, state: _TypeState, name: str) -> bool:
        """Does a response in flight change what the client holds of `name`? (Delta: it names
        it, updated or removed.)"""
        return any(name in pending.resources or name in pending.removed for pending in state.pending.values())

    def _confirmed_otherwise(self, state: _TypeState, name: str) -> bool:
        return False

    def _client_copy(self, state: _TypeState, name: str) -> EncodedResource | None:
        """The version of `name` the client has (or is being sent), if any."""
        if state.pending:
            return state.pending[state.last_nonce].resources.get(name)
        return state.acked.get(name)


_SENT_HISTORY = 32
_GATED = frozenset({res.LISTENER, res.ROUTE})


def _any_refs(items: Iterable[EncodedResource]) -> bool:
    return any(item.refs for item in items)


class SotwStream(_Stream):
    """State-of-the-world xDS over one ADS stream."""

    kind = "sotw"

    def _held_resources(self, state: _TypeState) -> Iterable[EncodedResource]:
        # Oldest first: a resource kept for the client is its newest copy (`_desired`).
        for resources in state.superseded.values():
            yield from resources.values()
        yield from state.acked.values()
        for pending in state.pending.values():
            yield from pending.resources.values()

    @staticmethod
    def _answered(state: _TypeState, nonce: str, applied: bool) -> None:
        """The client answered `nonce`, so every response before it was answered too (in order):
        those superseded responses are no longer possibly held. A stale ACK says what it holds."""
        if nonce in state.superseded:
            if applied:
                state.acked = state.superseded[nonce]
            for key in list(state.superseded):
                del state.superseded[key]
                if key == nonce:
                    break
        elif nonce == state.last_nonce:
            state.superseded.clear()

    @staticmethod
    def _supersede(state: _TypeState) -> None:
        for nonce, pending in state.pending.items():
            state.superseded[nonce] = pending.resources
        while len(state.superseded) > _SENT_HISTORY:
            del state.superseded[next(iter(state.superseded))]

    # Two shortcuts on the push/ACK hot path: an ACK that cannot change what any type should
    # hold skips the sync (`_plain_ack`), and a type found quiet is not worked out again until
    # its selection or the stream changes (`_TypeState.quiet`). The property tests turn them
    # off on a copy of the stream and check that every answer is the same.
    shortcuts = True

    def _names_key(self, state: _TypeState) -> frozenset[str]:
        return state.names_key

    def _in_flight(self, state: _TypeState, name: str) -> bool:
        """A SotW response is the whole set: any response in flight, or replaced before the
        client answered it, may change what the client holds of `name` (one that lacks it
        removes it; one that carries it may be NACKed after an earlier one was applied). Found
        by the state machine: with clusters lacking c0 in flight, a listener naming c0 went out
        on the strength of an older ACK."""
        return bool(state.pending) or bool(state.superseded)

    def _plain_ack(self, request: SotwRequest, state: _TypeState) -> bool:
        """An ACK of the latest response, with the same subscription, of a type other than
        clusters: the sync that follows an ACK could only send something if the ACK changed
        a cluster's confirmation (gating) or the set of references the client holds (what is
        kept), and neither moves when what the ACK replaces referred to nothing the ACKed
        content does not refer to as well. The common ACK (EDS after a push) is this one."""
        if not self.shortcuts or request.error is not None or request.type_url == res.CLUSTER or state.superseded:
            return False
        pending = state.pending.get(request.response_nonce)
        if pending is None or request.response_nonce != state.last_nonce:
            return False
        if request.star or (not request.resource_names and request.type_url in res.FULL_STATE_TYPES):
            if not state.wildcard:
                return False
        elif state.wildcard or state.names_key != request.names_key:
            return False
        refs = [ref for item in state.acked.values() for ref in item.refs]
        return not refs or set(refs) <= {ref for item in pending.resources.values() for ref in item.refs}

    def receive(self, request: SotwRequest) -> list[Action]:
        state = self._begin(request)
        if state.requested and self._plain_ack(request, state):
            acked = state.pending.pop(request.response_nonce)
            state.acked, state.acked_version, state.acked_digest = acked.resources, acked.version, acked.digest
            state.quiet = None  # its own type is looked at again; the others cannot change
            return [Acked(request.type_url, acked.version, acked.nonce)]
        self.generation += 1
        actions: list[Action] = []
        if request.response_nonce:
            self._answered(state, request.response_nonce, applied=request.error is None)
            if request.response_nonce != state.last_nonce:
                # Ignored, as the protocol says; but a rejection of content we sent is
                # remembered, so that content is never sent to this client again.
                rejected = state.sent.get(request.response_nonce)
                # What it says may have moved what the client holds (`_answered`): look again.
                if request.error is not None and rejected is not None:
                    state.nacked = {*state.nacked, split_version(rejected)[1]}
                    return [Nacked(request.type_url, rejected, request.response_nonce, request.error), *self._sync()]
                return [Stale(request.type_url, request.response_nonce), *self._sync()]
            pending = state.pending.pop(request.response_nonce, None)
            if pending is None and request.error is None:
                # Not an ACK (that came before): the client asks again, e.g. a cluster whose
                # lease ran out came back and watches its endpoints anew; it may have dropped
                # what it had, so it gets an answer even if we think it holds that already.
                state.asked_again = True
            if pending is not None:
                if request.error is not None:
                    state.nacked = {*state.nacked, split_version(pending.version)[1]}
                    actions.append(Nacked(request.type_url, pending.version, pending.nonce, request.error))
                else:
                    state.acked, state.acked_version, state.acked_digest = (
                        pending.resources, pending.version, pending.digest
                    )
                    actions.append(Acked(request.type_url, pending.version, pending.nonce))
        elif not state.requested and request.version_info:
            # A client coming back (after a reconnect, maybe to another replica) with a version.
            state.floor, state.client_digest = split_version(request.version_info)
            state.acked_version, state.acked_digest = request.version_info, state.client_digest
        state.requested = True
        state.wildcard = request.star or (not request.resource_names and request.type_url in res.FULL_STATE_TYPES)
        state.names = state.names_key = request.names_key or _NONE  # shared by the streams that sent the same
        actions.extend(self._sync())
        return actions

    def _compute(self, type_url: str) -> Send | None:
        assert self.snapshot is not None
        state = self.types[type_url]
        if not state.requested:
            return None
        if not state.wildcard and not state.names:
            # The client watches nothing of this type (its last watch went, e.g. a leased cluster
            # expired): Envoy does not ACK an answer to that, which would stay pending forever.
            state.acked, state.pending = {}, {}
            state.superseded.clear()
            return None
        if self.snapshot.index < state.floor:
            return None  # this replica is behind what the client already has
        selection = self._selection(type_url, state)
        quiet = (selection.digest, self.generation)
        if state.quiet == quiet and self.shortcuts:
            return None  # nothing moved since this type was found to need nothing
        replaced = state.pending.get(state.last_nonce)
        send = self._compute_send(type_url, state, selection)
        # Quiet only until something is sent: a push of B, then back to A before B's ACK, must
        # send A again though A was once found to need nothing (it did, with A held).
        state.quiet = quiet if send is None else None
        if send is not None and (type_url == res.CLUSTER or _any_refs(send.resources) or (
            replaced is not None and _any_refs(replaced.resources.values())
        )):
            # What other types depend on moved: a cluster's confirmation (gating) or the
            # references the client holds. A response of resources that refer to nothing
            # (endpoints, the common push) moves neither.
            self.generation += 1
        return send

    def _compute_send(self, type_url: str, state: _TypeState, selection: Selection) -> Send | None:
        assert self.snapshot is not None
        desired = self._desired(type_url, state)
        if desired is selection.resources:  # the common case: shared, sorted and digested once
            items, digest, version = selection.items, selection.digest, selection.version
        else:
            items = tuple(desired[name] for name in sorted(desired))
            digest = set_digest(items)
            version = f"{self.snapshot.version}-{digest}"
        asked_again, state.asked_again = state.asked_again, False
        if state.client_digest:
            # First look after a reconnect: does the client already hold exactly this?
            came_back_with, state.client_digest = state.client_digest, ""
            if came_back_with == digest:
                state.acked = desired
                self.generation += 1  # what the client holds changed: not "quiet"
                return None
        if state.pending:
            if state.pending[state.last_nonce].digest == digest:
                return None  # already on its way
        elif state.acked_version and state.acked_digest == digest and not asked_again:
            return None  # the client has it
        if digest in state.nacked:
            return None  # rejected once: never again to this client
        nonce = self._next_nonce()
        state.last_nonce = nonce
        self._supersede(state)
        state.pending = {nonce: _Pending(nonce, version, desired, digest=digest)}  # only the latest counts
        state.sent[nonce] = version
        if len(state.sent) > _SENT_HISTORY:
            del state.sent[next(iter(state.sent))]
        return Send(type_url, version, nonce, items, (), self.snapshot)

    def _renewal(self, type_url: str, state: _TypeState) -> Send | None:
        assert self.snapshot is not None
        desired = self._desired(type_url, state)
        if not any(item.ttl is not None for item in desired.values()):
            return None
        items = tuple(desired[name] for name in sorted(desired))
        if not state.acked_version or split_version(state.acked_version)[1] != set_digest(items):
            return None
        # SotW sends the whole set: a body-less heartbeat Resource made Envoy 1.40 remove the
        # cluster (bench/xds_ttl.py), the whole set at the same version renews its TTL.
        nonce = self._next_nonce()
        state.last_nonce = nonce
        self._supersede(state)
        state.pending = {nonce: _Pending(nonce, state.acked_version, desired, digest=state.acked_digest)}
        state.sent[nonce] = state.acked_version
        if len(state.sent) > _SENT_HISTORY:
            del state.sent[next(iter(state.sent))]
        if type_url == res.CLUSTER or _any_refs(items):
            self.generation += 1  # clusters in flight again: what other types gate on moved
        return Send(type_url, state.acked_version, nonce, items, (), self.snapshot)


class DeltaStream(_Stream):
    """Incremental (Delta) xDS over one ADS stream."""

    kind = "delta"
    # At most this many responses of one type wait for an ACK (xds.limits.max_unacked_delta):
    # a client that stops answering is sent nothing more of that type until it answers.
    max_unacked: int | None = None
    throttled = False  # set when a response was held back by max_unacked (the server counts it)

    def _held_resources(self, state: _TypeState) -> Iterable[EncodedResource]:
        yield from state.held.values()
        yield from state.acked.values()
        for pending in state.pending.values():
            yield from pending.resources.values()

    def _client_copy(self, state: _TypeState, name: str) -> EncodedResource | None:
        return state.held.get(name)

    def _confirmed_otherwise(self, state: _TypeState, name: str) -> bool:
        # After a reconnect the client names what it has in initial_resource_versions.
        return name in state.client_versions

    def receive(self, request: DeltaRequest) -> list[Action]:
        state = self._begin(request)
        actions: list[Action] = []
        if request.response_nonce:
            pending = state.pending.pop(request.response_nonce, None)
            if pending is None:
                actions.append(Stale(request.type_url, request.response_nonce))
            elif request.error is not None:
                for name, item in pending.resources.items():
                    state.nacked = {*state.nacked, f"{name}:{item.version}"}
                self._replay(state)
                actions.append(Nacked(request.type_url, pending.version, pending.nonce, request.error))
            else:
                acked = dict(state.acked)
                for name in pending.removed:
                    acked.pop(name, None)
                    state.known_versions.pop(name, None)
                acked.update(pending.resources)
                state.known_versions.update({name: item.version for name, item in pending.resources.items()})
                state.acked = acked
                state.acked_version = pending.version
                actions.append(Acked(request.type_url, pending.version, pending.nonce))
        if not state.requested:
            state.requested = True
            state.client_versions.update(request.initial_versions)
            state.known_versions.update(request.initial_versions)
            subscribe = set(request.subscribe)
            state.wildcard = not subscribe or "*" in subscribe
        subscribe = set(request.subscribe)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in request.unsubscribe:
            state.wildcard = False
        names = {*state.names, *(subscribe - {"*"})}
        for name in request.unsubscribe:
            names.discard(name)
            if name in state.told_missing:
                state.told_missing = state.told_missing - {name}
            if not state.wildcard:
                state.held.pop(name, None)
                state.client_versions.pop(name, None)
                state.known_versions.pop(name, None)
        state.names = names
        if state.told_missing and subscribe:
            state.told_missing = state.told_missing - subscribe  # a new subscription is answered afresh
        actions.extend(self._sync())
        return actions

    @staticmethod
    def _replay(state: _TypeState) -> None:
        """After a NACK: what the client holds is what it confirmed (ACKs and the versions it
        came back with, in the order it answered) with the responses still in flight on top.
        Envoy answers in order, so a NACK of an older response undoes only that one, never a
        later response's view (rolling each NACKed response back on its own did not)."""
        versions = dict(state.known_versions)
        held = {name: item for name, item in state.acked.items() if name in versions}
        for pending in state.pending.values():  # in the order they were sent
            for name in pending.removed:
                held.pop(name, None)
                versions.pop(name, None)
            for name, item in pending.resources.items():
                held[name] = item
                versions[name] = item.version
        state.held, state.client_versions = held, versions

    def _compute(self, type_url: str) -> Send | None:
        assert self.snapshot is not None
        state = self.types[type_url]
        if not state.requested:
            return None
        if self.max_unacked is not None and len(state.pending) >= self.max_unacked:
            self.throttled = True
            return None
        desired = self._desired(type_url, state)
        updates: dict[str, EncodedResource] = {}
        for name in sorted(desired):
            item = desired[name]
            if state.client_versions.get(name) == item.version:
                state.held.setdefault(name, item)
                continue
            if f"{name}:{item.version}" in state.nacked:
                continue
            updates[name] = item
        removed = [name for name in sorted(state.client_versions) if name not in desired]
        current = self.snapshot.get(type_url)
        missing = sorted(
            name for name in state.names
            if name not in current and name not in desired and name not in state.client_versions
            and name not in state.told_missing
        )
        if not updates and not removed and not missing:
            return None
        nonce = self._next_nonce()
        for name, item in updates.items():
            state.held[name] = item
            state.client_versions[name] = item.version
        for name in removed:
            state.held.pop(name, None)
            state.client_versions.pop(name, None)
        state.told_missing = {*state.told_missing, *missing}
        version = self.snapshot.version
        all_removed = tuple(removed + missing)
        state.pending[nonce] = _Pending(nonce, version, updates, all_removed)
        return Send(type_url, version, nonce, tuple(updates.values()), all_removed, self.snapshot)

    def _renewal(self, type_url: str, state: _TypeState) -> Send | None:
        assert self.snapshot is not None
        desired = self._desired(type_url, state)
        leased = {
            name: item for name, item in sorted(desired.items())
            if item.ttl is not None and state.client_versions.get(name) == item.version
        }
        if not leased:
            return None
        nonce = self._next_nonce()
        version = self.snapshot.version
        state.pending[nonce] = _Pending(nonce, version, leased)
        return Send(type_url, version, nonce, tuple(leased.values()), (), self.snapshot)
