"""The replicated state machine: `apply(state, command, index)` and its (de)serialisation.

`apply` is pure and deterministic: no I/O, no clock, no randomness, no dependence on dict
order it did not create. Every control-plane replica applies the same log and must reach
byte-identical states (`encode_state` of equal states gives equal bytes), because versions
rendered for Envoy are Raft indexes (DESIGN, invariant 4).

Rules (DESIGN, invariants 1 and 6):

- The returned state always carries `index`; `last_change` and the touched service's
  `changed_at` move to `index` only when something changed.
- An epoch is the Raft index that committed a role, so epochs only grow.
- A rejection changes nothing but `index`.
- An orchestrator's fencing token (`SetPrimary.token`, the API's claimed epoch) must be greater
  than the service's `claim`, which it becomes: claims are monotonic per service.
- The failover history (`RecordFailover`) keeps the newest `keep` records and the newest
  `keep_keys` idempotency keys; an update older than the stored one (`rev`) is ignored. Neither
  moves `last_change`: routing did not change.
- Snapshots (`StartSnapshot`, `UpdateSnapshot`): one running snapshot per service; its intent is
  refused unless the member has the stated role at the stated epoch. A change of a member's pool
  (`in`/`draining`/`out`) is a change of routing and moves `last_change`. Any entry that changes a
  service's epoch or primary, removes the member or deletes the service aborts its running
  snapshot in that same entry and returns the member to the pool (epoch fencing); a move to
  `completed` is refused unless role and epoch still hold.
- Restore drills (`VerifySnapshot`): only a completed snapshot is verified, one drill at a time;
  only the running attempt (`drill`) may end. Not a change of routing.
- Consistent points (`StartHold`, `UpdateHold`): one open (intent or holding) at a time, over
  known services; `intent` → `holding` (with its deadline `hold_until`) → `released`, or
  `aborted` from either; a finished one never changes status again. A move into or out of
  `holding` moves `last_change` (the renderer's hold route; the deadline itself is read by
  each node's clock, `MeshState.held_services(now)`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from repstage_mesh.core.models import (
    FROM_LOG,
    AnnounceNode,
    AuditEntry,
    Command,
    CommandEnvelope,
    DeleteService,
    MeshState,
    Noop,
    Outcome,
    PutService,
    RecordFailover,
    Rejection,
    ServiceSpec,
    ServiceState,
    SetPrimary,
    SnapshotEntry,
    StartHold,
    StartSnapshot,
    UpdateHold,
    UpdateSnapshot,
    VerifySnapshot,
)

__all__ = [
    "apply",
    "decode_command",
    "decode_state",
    "encode_command",
    "encode_state",
    "initial_state",
    "replay",
]


def apply(state: MeshState, command: Command, index: int) -> tuple[MeshState, Outcome]:
    """Apply one committed command at Raft index `index`; return the new state and the outcome.

    `index` must be greater than `state.index` (Raft indexes only grow); anything else is a
    programming error and raises ValueError, because an epoch taken from a reused index
    could equal an existing one.
    """
    if index <= state.index:
        raise ValueError(f"index {index} must be greater than the state's index {state.index}")
    if isinstance(command, PutService):
        return _audited(command, index, *_fenced(*_put_service(state, command, index), index))
    if isinstance(command, DeleteService):
        return _audited(command, index, *_fenced(*_delete_service(state, command, index), index))
    if isinstance(command, SetPrimary):
        return _audited(command, index, *_fenced(*_set_primary(state, command, index), index))
    if isinstance(command, Noop):
        return _unchanged(state, index), Outcome(ok=True, result={"noop": True})
    if isinstance(command, RecordFailover):
        return _record_failover(state, command, index)
    if isinstance(command, StartSnapshot):
        return _start_snapshot(state, command, index)
    if isinstance(command, UpdateSnapshot):
        return _update_snapshot(state, command, index)
    if isinstance(command, VerifySnapshot):
        return _verify_snapshot(state, command, index)
    if isinstance(command, StartHold):
        return _start_hold(state, command, index)
    if isinstance(command, UpdateHold):
        return _update_hold(state, command, index)
    if isinstance(command, AnnounceNode):
        node = command.node
        if state.nodes.get(node.node_id) == node:
            return _unchanged(state, index), Outcome(ok=True, result={"node": node.node_id, "changed": False})
        nodes = dict(sorted({**state.nodes, node.node_id: node}.items()))
        # Not a change of routing: `last_change` (the xDS version) stays.
        return state.model_copy(update={"nodes": nodes, "index": index}), Outcome(
            ok=True, result={"node": node.node_id, "changed": True}
        )
    raise TypeError(f"not a command: {type(command).__name__}")


def initial_state(specs: Sequence[ServiceSpec]) -> list[Command]:
    """The commands that seed a fresh log with the services a config file declares."""
    return [PutService(spec=spec) for spec in specs]


def replay(
    commands: Iterable[Command], state: MeshState | None = None
) -> tuple[MeshState, list[Outcome]]:
    """Apply `commands` at consecutive indexes after `state.index` (a fresh state by default)."""
    current = state if state is not None else MeshState()
    outcomes: list[Outcome] = []
    for command in commands:
        current, outcome = apply(current, command, current.index + 1)
        outcomes.append(outcome)
    return current, outcomes


# --- serialisation --------------------------------------------------------------------------


def encode_command(envelope: CommandEnvelope) -> bytes:
    """The bytes written to the Raft log for one command."""
    return envelope.model_dump_json().encode()


def decode_command(data: bytes) -> CommandEnvelope:
    """Inverse of `encode_command`. Raises pydantic.ValidationError on bad input. Entries that
    older versions wrote with an inline `promote_hook` or a `password_env` are read without
    them (models.FROM_LOG): the service keeps everything else, and names no hook or secret."""
    return CommandEnvelope.model_validate_json(data, context=FROM_LOG)


def encode_state(state: MeshState) -> bytes:
    """Canonical bytes for a state: sorted keys, no whitespace; equal states give equal bytes."""
    return json.dumps(
        state.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def decode_state(data: bytes) -> MeshState:
    """Inverse of `encode_state`. Raises pydantic.ValidationError on bad input."""
    return MeshState.model_validate_json(data, context=FROM_LOG)


# --- the audit trail ------------------------------------------------------------------------


def _audited(
    command: PutService | DeleteService | SetPrimary, index: int, state: MeshState, outcome: Outcome
) -> tuple[MeshState, Outcome]:
    """Append one `AuditEntry` for a write that changed something (refused writes and repeats
    change nothing, not even the trail). Who, and how many entries to keep, travel in the
    command (`by`), so every replica keeps the same trail; a write without `by` is the control
    plane's own (seeding the config's services, a failover)."""
    if not outcome.ok or not outcome.result.get("changed", False):
        return state, outcome
    keep = command.by.keep if command.by is not None else state.audit_keep
    actor = command.by.actor if command.by is not None else "control-plane"
    if isinstance(command, PutService):
        service, detail = command.spec.name, "created" if outcome.result.get("created") else "spec replaced"
    elif isinstance(command, DeleteService):
        service, detail = command.name, "deleted"
    else:
        service = command.service
        detail = f"primary {command.member or 'none'} at epoch {outcome.result.get('epoch')} ({command.cause})"
    entry = AuditEntry(index=index, actor=actor, action=command.kind, service=service,
                       detail=detail[:300])
    trail = (*state.audit, entry)[-keep:] if keep > 0 else ()
    return state.model_copy(update={"audit": trail, "audit_keep": keep}), outcome


# --- the rules ------------------------------------------------------------------------------


def _unchanged(state: MeshState, index: int) -> MeshState:
    return state.model_copy(update={"index": index})


RejectionCode = Literal["not_found", "stale_epoch", "conflict", "invalid"]


def _reject(
    state: MeshState, index: int, code: RejectionCode, message: str, field: str
) -> tuple[MeshState, Outcome]:
    rejection = Rejection(code=code, message=message, field=field)
    return _unchanged(state, index), Outcome(ok=False, rejection=rejection)


def _with_services(state: MeshState, services: Mapping[str, ServiceState], index: int) -> MeshState:
    # Services are kept sorted by name so that the state does not depend on the order in
    # which services were created and deleted.
    ordered = {name: services[name] for name in sorted(services)}
    return state.model_copy(update={"services": ordered, "index": index, "last_change": index})


def _role_result(
    name: str,
    before: ServiceState | None,
    after: ServiceState,
    changed: bool,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "service": name,
        "primary": after.primary,
        "epoch": after.epoch,
        "changed": changed,
        "previous_primary": before.primary if before is not None else None,
        "previous_epoch": before.epoch if before is not None else 0,
        **extra,
    }


def _port_conflict(state: MeshState, spec: ServiceSpec) -> tuple[str, str] | None:
    """(field, message) when a port of `spec` is already used by another service."""
    taken: dict[int, str] = {}
    for other in state.services.values():
        if other.name == spec.name:
            continue
        taken[other.spec.listen_port] = f"listen_port of service {other.name!r}"
        if other.spec.read_port is not None:
            taken[other.spec.read_port] = f"read_port of service {other.name!r}"
    for field, port in (("listen_port", spec.listen_port), ("read_port", spec.read_port)):
        if port is not None and port in taken:
            return field, f"port {port} is already the {taken[port]}"
    return None


def _put_service(state: MeshState, command: PutService, index: int) -> tuple[MeshState, Outcome]:
    spec = command.spec
    conflict = _port_conflict(state, spec)
    if conflict is not None:
        field, message = conflict
        return _reject(state, index, "conflict", message, field)

    current = state.services.get(spec.name)
    if current is None:
        primary = spec.primary
        new = ServiceState(
            spec=spec, primary=primary, epoch=index if primary is not None else 0, changed_at=index,
            promotions=((primary, 1),) if primary is not None else (),
        )
        services = {**state.services, spec.name: new}
        result = _role_result(spec.name, None, new, True, created=True)
        return _with_services(state, services, index), Outcome(ok=True, result=result)

    if current.spec == spec:
        result = _role_result(spec.name, current, current, False, created=False)
        return _unchanged(state, index), Outcome(ok=True, result=result)

    primary, epoch = current.primary, current.epoch
    if primary is not None and spec.member(primary) is None:
        # The primary was removed from the members: fail closed unless the spec names one.
        primary, epoch = spec.primary, index
    elif primary is None and spec.primary is not None:
        # No primary is known: the spec's declared primary is the best knowledge there is.
        primary, epoch = spec.primary, index
    carried = ServiceState(spec=spec, primary=current.primary, promotions=current.promotions)
    promotions = carried.promoted(primary if primary != current.primary else None)
    new = ServiceState(spec=spec, primary=primary, epoch=epoch, changed_at=index, promotions=promotions)
    services = {**state.services, spec.name: new}
    result = _role_result(spec.name, current, new, True, created=False)
    return _with_services(state, services, index), Outcome(ok=True, result=result)


def _delete_service(
    state: MeshState, command: DeleteService, index: int
) -> tuple[MeshState, Outcome]:
    current = state.services.get(command.name)
    if current is None:
        return _reject(state, index, "not_found", f"no service named {command.name!r}", "name")
    services = {name: svc for name, svc in state.services.items() if name != command.name}
    result = {
        "service": command.name,
        "deleted": True,
        "changed": True,
        "previous_primary": current.primary,
        "previous_epoch": current.epoch,
    }
    return _with_services(state, services, index), Outcome(ok=True, result=result)


def _set_primary(state: MeshState, command: SetPrimary, index: int) -> tuple[MeshState, Outcome]:
    current = state.services.get(command.service)
    if current is None:
        return _reject(
            state, index, "not_found", f"no service named {command.service!r}", "service"
        )
    if command.member is not None and current.spec.member(command.member) is None:
        members = [m.name for m in current.spec.members]
        message = f"{command.member!r} is not a member of service {command.service!r} (members: {members})"
        return _reject(state, index, "not_found", message, "member")
    if command.epoch is not None and command.epoch <= current.epoch:
        message = (
            f"epoch {command.epoch} is stale: the current epoch of service {command.service!r} is "
            f"{current.epoch}; a claim must be greater (for example {current.epoch + 1})"
        )
        return _reject(state, index, "stale_epoch", message, "epoch")

    if command.token is not None and command.token <= current.claim:
        message = (
            f"epoch {command.token} is stale: the orchestrator's epoch (fencing token) of service "
            f"{command.service!r} is already {current.claim}; a claim must be greater"
        )
        return _reject(state, index, "stale_epoch", message, "epoch")
    claim = command.token if command.token is not None else current.claim

    if command.epoch is None and command.member == current.primary:
        result = _role_result(command.service, current, current, False, cause=command.cause)
        if claim == current.claim:
            return _unchanged(state, index), Outcome(ok=True, result=result)
        # A newer claim of the same primary: remembered, routing unchanged (`last_change` stays).
        kept = {**state.services, command.service: current.model_copy(update={"claim": claim})}
        return state.model_copy(update={"services": kept, "index": index}), Outcome(ok=True, result=result)

    promoted = command.member if command.member != current.primary else None
    new = current.model_copy(
        update={
            "primary": command.member,
            "epoch": index,
            "changed_at": index,
            "promotions": current.promoted(promoted),
            "claim": claim,
        }
    )
    services = {**state.services, command.service: new}
    result = _role_result(command.service, current, new, True, cause=command.cause)
    if command.trace:
        result["trace"] = dict(command.trace)  # every node's push joins the failover's trace
    return _with_services(state, services, index), Outcome(ok=True, result=result)


def _record_failover(state: MeshState, command: RecordFailover, index: int) -> tuple[MeshState, Outcome]:
    entry = command.entry
    entries = list(state.failovers)
    at = next((i for i, e in enumerate(entries) if e.id == entry.id), None)
    if at is not None and entries[at].rev >= entry.rev:
        return _unchanged(state, index), Outcome(ok=True, result={"failover": entry.id, "changed": False})
    if at is not None:
        entries[at] = entry
    else:
        entries.append(entry)
    dropped = max(0, len(entries) - command.keep)
    keys = state.request_keys
    keys_dropped = 0
    if command.key is not None and all(known != command.key for known, _ in keys):
        keys = (*keys, (command.key, entry.id))
        keys_dropped = max(0, len(keys) - command.keep_keys)
        keys = keys[keys_dropped:]
    update = {"failovers": tuple(entries[dropped:]), "request_keys": keys, "index": index}
    result = {"failover": entry.id, "changed": True, "dropped": dropped, "keys_dropped": keys_dropped}
    return state.model_copy(update=update), Outcome(ok=True, result=result)


# --- snapshots --------------------------------------------------------------------------------


def _fenced(state: MeshState, outcome: Outcome, index: int) -> tuple[MeshState, Outcome]:
    """Abort, in this same entry, every running snapshot whose member no longer has the role
    and epoch of its intent (or is gone); the member returns to the read pool at once."""
    if not outcome.ok or not any(s.running for s in state.snapshots):
        return state, outcome
    entries, aborted = [], []
    for entry in state.snapshots:
        reason = _fence_reason(state, entry)
        if reason is None:
            entries.append(entry)
            continue
        aborted.append(entry.id)
        entries.append(entry.model_copy(update={
            "status": "aborted", "pool": "in", "error": f"aborted at Raft index {index}: {reason}",
        }))
    if not aborted:
        return state, outcome
    result = {**outcome.result, "aborted_snapshots": aborted}
    update = {"snapshots": tuple(entries), "last_change": index, "index": index}
    return state.model_copy(update=update), outcome.model_copy(update={"result": result})


def _fence_reason(state: MeshState, entry: SnapshotEntry) -> str | None:
    if not entry.running:
        return None
    service = state.service(entry.service)
    if service is None:
        return f"service {entry.service!r} was deleted"
    if service.spec.member(entry.member) is None:
        return f"{entry.member!r} is no longer a member of {entry.service!r}"
    if service.epoch != entry.epoch or service.role_of(entry.member) != entry.role:
        role = service.role_of(entry.member).value
        return (f"{entry.member!r} was {entry.role.value} at epoch {entry.epoch} and is now {role} "
                f"at epoch {service.epoch}")
    return None


def _start_snapshot(state: MeshState, command: StartSnapshot, index: int) -> tuple[MeshState, Outcome]:
    entry = command.entry
    service = state.service(entry.service)
    if service is None:
        return _reject(state, index, "not_found", f"no service named {entry.service!r}", "service")
    if service.spec.member(entry.member) is None:
        members = [m.name for m in service.spec.members]
        return _reject(state, index, "not_found", f"{entry.member!r} is not a member of {entry.service!r} (members: {members})", "member")
    if state.snapshot(entry.id) is not None:
        return _reject(state, index, "conflict", f"snapshot id {entry.id!r} is already used", "id")
    running = state.running_snapshot(entry.service)
    if running is not None:
        return _reject(state, index, "conflict", f"snapshot {running.id} of {entry.service!r} is still running", "service")
    if service.epoch != entry.epoch or service.role_of(entry.member) != entry.role:
        message = (f"{entry.member!r} is {service.role_of(entry.member).value} at epoch {service.epoch}, "
                   f"not {entry.role.value} at epoch {entry.epoch}")
        return _reject(state, index, "stale_epoch", message, "epoch")
    new = entry.model_copy(update={"intent_index": index, "status": "running", "pool": "in"})
    finished = [s for s in state.snapshots if not s.running]
    dropped = {s.id for s in finished[: max(0, len(finished) + 1 - command.keep)]}
    entries = (*(s for s in state.snapshots if s.id not in dropped), new)
    result = {"snapshot": entry.id, "intent_index": index, "dropped": len(dropped)}
    return state.model_copy(update={"snapshots": entries, "index": index}), Outcome(ok=True, result=result)


def _update_snapshot(state: MeshState, command: UpdateSnapshot, index: int) -> tuple[MeshState, Outcome]:
    entry = state.snapshot(command.id)
    if entry is None:
        return _reject(state, index, "not_found", f"no snapshot {command.id!r}", "id")
    if not entry.running:
        # The first end wins: a finished snapshot never completes later nor leaves the pool
        # again; a later failed/aborted status is ignored (its steps and undo still apply).
        if (command.status == "completed" and entry.status != "completed") or command.pool not in (None, "in"):
            message = f"snapshot {entry.id} is {entry.status}: {entry.error or 'finished'}"
            return _reject(state, index, "conflict", message, "status")
        command = command.model_copy(update={"status": None, "error": None})
    elif command.status == "completed":
        reason = _fence_reason(state, entry)
        if reason is not None:
            return _reject(state, index, "stale_epoch", f"snapshot {entry.id} cannot complete: {reason}", "status")
    update: dict[str, object] = {
        name: value for name, value in (
            ("status", command.status), ("pool", command.pool), ("undo", command.undo),
            ("lease_holder", command.lease_holder), ("lease_until", command.lease_until),
            ("error", command.error), ("artifact", command.artifact), ("point", command.point),
            ("size_bytes", command.size_bytes),
        ) if value is not None
    }
    if command.steps:
        update["steps"] = (*entry.steps, *command.steps)
    new = entry.model_copy(update=update)
    entries = tuple(new if s.id == entry.id else s for s in state.snapshots)
    moved = new.pool != entry.pool
    changes: dict[str, object] = {"snapshots": entries, "index": index}
    if moved:
        changes["last_change"] = index  # the read pool changed: a new xDS version
    result = {"snapshot": entry.id, "status": new.status, "pool": new.pool, "pool_changed": moved}
    return state.model_copy(update=changes), Outcome(ok=True, result=result)


def _verify_snapshot(state: MeshState, command: VerifySnapshot, index: int) -> tuple[MeshState, Outcome]:
    entry = state.snapshot(command.id)
    if entry is None:
        return _reject(state, index, "not_found", f"no snapshot {command.id!r}", "id")
    new, current = command.verification, entry.verification
    if new.running:
        if entry.status != "completed":
            return _reject(state, index, "conflict", f"snapshot {entry.id} is {entry.status}; only a completed "
                           "snapshot can be verified", "id")
        if current is not None and current.running:
            return _reject(state, index, "conflict", f"drill {current.drill} of snapshot {entry.id} is still "
                           "running", "id")
    elif current is None or not current.running or current.drill != new.drill:
        return _reject(state, index, "conflict", f"drill {new.drill} of snapshot {entry.id} is not running", "drill")
    entries = tuple(s.model_copy(update={"verification": new}) if s.id == entry.id else s for s in state.snapshots)
    result = {"snapshot": entry.id, "drill": new.drill, "verification": new.status}
    return state.model_copy(update={"snapshots": entries, "index": index}), Outcome(ok=True, result=result)
# --- consistent points ------------------------------------------------------------------------

_HOLD_MOVES = {"intent": {"holding", "aborted"}, "holding": {"released", "aborted"}}


def _start_hold(state: MeshState, command: StartHold, index: int) -> tuple[MeshState, Outcome]:
    entry = command.entry
    unknown = [s for s in entry.services if state.service(s) is None]
    if unknown:
        return _reject(state, index, "not_found", f"no service named {unknown[0]!r}", "services")
    if len(set(entry.services)) != len(entry.services):
        return _reject(state, index, "invalid", "a service is named twice", "services")
    if state.hold(entry.id) is not None:
        return _reject(state, index, "conflict", f"consistent point id {entry.id!r} is already used", "id")
    other = next((h for h in state.holds if h.open), None)
    if other is not None:
        return _reject(state, index, "conflict", f"consistent point {other.id} is still {other.status}", "services")
    new = entry.model_copy(update={"intent_index": index, "status": "intent", "hold_until": 0.0})
    finished = [h for h in state.holds if not h.open]
    dropped = {h.id for h in finished[: max(0, len(finished) + 1 - command.keep)]}
    holds = (*(h for h in state.holds if h.id not in dropped), new)
    result = {"hold": entry.id, "intent_index": index, "dropped": len(dropped)}
    return state.model_copy(update={"holds": holds, "index": index}), Outcome(ok=True, result=result)


def _update_hold(state: MeshState, command: UpdateHold, index: int) -> tuple[MeshState, Outcome]:
    entry = state.hold(command.id)
    if entry is None:
        return _reject(state, index, "not_found", f"no consistent point {command.id!r}", "id")
    status = command.status
    if status is not None and status != entry.status and status not in _HOLD_MOVES.get(entry.status, set()):
        return _reject(state, index, "conflict", f"consistent point {entry.id} is {entry.status}, cannot become {status}", "status")
    if status == "holding" and entry.status != "holding" and command.hold_until is None:
        return _reject(state, index, "invalid", "holding needs hold_until", "hold_until")
    update: dict[str, object] = {
        name: value for name, value in (
            ("status", status), ("hold_until", command.hold_until), ("leader", command.leader),
            ("points", command.points), ("snapshots", command.snapshots), ("held_ms", command.held_ms),
            ("error", command.error),
        ) if value is not None
    }
    if command.steps:
        update["steps"] = (*entry.steps, *command.steps)
    new = entry.model_copy(update=update)
    changes: dict[str, object] = {"holds": tuple(new if h.id == entry.id else h for h in state.holds), "index": index}
    if (new.status == "holding") != (entry.status == "holding"):
        changes["last_change"] = index  # the hold route appears or goes: a new xDS version
    return state.model_copy(update=changes), Outcome(ok=True, result={"hold": entry.id, "status": new.status})
