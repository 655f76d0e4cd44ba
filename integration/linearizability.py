"""A linearizability checker for recorded histories (Wing & Gong search with Lowe's memoisation).

A history is a list of `Operation`s, each with the time it was invoked and the time its answer
came back. It is linearizable when every operation can be given a single instant between its
invocation and its response such that, taken in that order, the operations are a legal sequential
run of the `Model`. Operations whose result is unknown (timed out, connection lost: `output is
None`) may take effect at any instant after their invocation, or never.

The search is P-compositional: operations are split by `key` (one service each) and every key is
checked on its own. Within a key it is the "just-in-time linearization" of Lowe (2017), as in
porcupine: walk the call/return events in time order, try to linearize each pending call as
early as possible, backtrack when a return is reached whose call has not been linearized, and
never revisit a (set of linearized operations, model state) pair.

The models are sans-IO: `init()` and `step(state, op) -> (ok, new_state)` on hashable states.
`PrimaryRegister` models a service's primary: `set_primary` and `read`, with epochs assigned by
the system (the Raft index that committed the change), so the model tracks the epoch as an
interval of values still possible after writes whose result was not seen.

`check(history, model)` returns a `CheckResult`; `.report()` is a JSON-serialisable account a
person can re-check: per key, the linearization found, or the longest linearizable prefix and the
operation that could not be placed after it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "CheckResult",
    "KeyResult",
    "Model",
    "Operation",
    "PrimaryRegister",
    "Register",
    "check",
    "check_key",
]

S = TypeVar("S", bound=Hashable)


@dataclass(frozen=True)
class Operation:
    """One client operation as recorded.

    `output is None` means the result is unknown (the operation may or may not have taken
    effect); its `ret` is then ignored (it may be None) and it is treated as answering at +inf.
    """

    id: int
    key: str
    name: str
    input: Mapping[str, Any]
    output: Mapping[str, Any] | None
    call: float
    ret: float | None
    client: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.call):
            raise ValueError(f"operation {self.id}: call must be a finite time")
        if self.output is not None:
            if self.ret is None:
                raise ValueError(f"operation {self.id}: ret is required when the output is known")
            if self.ret < self.call:
                raise ValueError(f"operation {self.id}: ret {self.ret} is before call {self.call}")

    @property
    def unknown(self) -> bool:
        return self.output is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "client": self.client,
            "name": self.name,
            "input": dict(self.input),
            "output": None if self.output is None else dict(self.output),
            "call": self.call,
            "ret": self.ret,  # for an unknown result: when the client gave up (ignored)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Operation:
        return cls(
            id=int(data["id"]),
            key=str(data["key"]),
            name=str(data["name"]),
            input=dict(data.get("input") or {}),
            output=None if data.get("output") is None else dict(data["output"]),
            call=float(data["call"]),
            ret=None if data.get("ret") is None else float(data["ret"]),
            client=str(data.get("client", "")),
        )


class Model(Protocol[S]):
    """A sequential specification. States must be hashable and compare by value."""

    @property
    def name(self) -> str: ...

    def init(self) -> S: ...

    def step(self, state: S, op: Operation) -> tuple[bool, S]:
        """Whether `op` (with its recorded output; or, when unknown, assuming it took effect) is
        legal in `state`, and the state after it."""
        ...

    def describe(self, state: S) -> Any:
        """A JSON-serialisable view of a state, for reports."""
        ...


# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    """A read/write register: `write {"value": v}` and `read -> {"value": v}`."""

    initial: Any = None
    name: str = "register"

    def init(self) -> Any:
        return self.initial

    def step(self, state: Any, op: Operation) -> tuple[bool, Any]:
        if op.name == "write":
            return True, op.input["value"]
        if op.name == "read":
            return (op.output is None or op.output.get("value") == state), state
        raise ValueError(f"operation {op.id}: name must be write or read, not {op.name!r}")

    def describe(self, state: Any) -> Any:
        return {"value": state}


# (primary, lowest possible epoch, highest possible epoch or None for unbounded, highest claim)
PrimaryState = tuple[str | None, int, int | None, int]


def _narrow(lo: int, hi: int | None, low: int | None = None, high: int | None = None) -> tuple[int, int | None] | None:
    """The interval [lo, hi] intersected with [low, high]; None when empty."""
    if low is not None:
        lo = max(lo, low)
    if high is not None:
        hi = high if hi is None else min(hi, high)
    if hi is not None and hi < lo:
        return None
    return lo, hi


@dataclass(frozen=True)
class PrimaryRegister:
    """The primary of one service, as the REST API exposes it.

    - `set_primary`, input `{"member": str | None, "expected_epoch": int | None}`; output
      `{"primary": m, "epoch": e}` when committed, or `{"rejected": "stale_epoch"}` when the
      expected epoch was not greater than the current one.
    - `read`, output `{"primary": m, "epoch": e}`: the committed primary and epoch.

    Epochs are assigned by the system (a Raft index): a committed change gets any epoch greater
    than the current one; setting the current primary again without an expected epoch changes
    nothing and answers the current epoch (state.py). After a change whose answer was lost the
    new epoch is unknown, so the state keeps the interval of epochs still possible; later
    answers narrow it.

    `claims=True` models the REST API since issue 14: `expected_epoch` is the caller's fencing
    token, compared with the highest token claimed before (kept exactly in the state), not with
    the system's epoch; a claim of the current primary keeps the epoch (and raises the claim).
    """

    initial_primary: str | None = None
    initial_epoch: int | None = 0  # None: unknown (any epoch >= 0)
    name: str = "primary-register"
    claims: bool = False
    initial_claim: int = 0

    def init(self) -> PrimaryState:
        if self.initial_epoch is None:
            return (self.initial_primary, 0, None, self.initial_claim)
        return (self.initial_primary, self.initial_epoch, self.initial_epoch, self.initial_claim)

    def step(self, state: PrimaryState, op: Operation) -> tuple[bool, PrimaryState]:
        if self.claims:
            return self._step_claims(state, op)
        primary, lo, hi, claim = state
        out = op.output
        if op.name == "read":
            if out is None:
                return True, state
            epoch = int(out["epoch"])
            if out.get("primary") != primary or _narrow(lo, hi, epoch, epoch) is None:
                return False, state
            return True, (primary, epoch, epoch, claim)
        if op.name != "set_primary":
            raise ValueError(f"operation {op.id}: name must be set_primary or read, not {op.name!r}")

        member = op.input.get("member")
        expected = op.input.get("expected_epoch")
        if out is not None and "rejected" in out:
            if out["rejected"] != "stale_epoch":
                raise ValueError(
                    f"operation {op.id}: output.rejected: only stale_epoch is modelled, not "
                    f"{out['rejected']!r} (record other refusals as nothing, or check them apart)"
                )
            if expected is None:
                return False, state
            # stale: the current epoch is at least the one asked for
            narrowed = _narrow(lo, hi, low=int(expected))
            if narrowed is None:
                return False, state
            return True, (primary, *narrowed, claim)

        # the change took effect (known success, or assumed for an unknown outcome)
        if expected is not None:
            fresh = _narrow(lo, hi, high=int(expected) - 1)  # the claim was not stale
            if fresh is None:
                return False, state
            lo, hi = fresh
        if expected is None and member == primary:
            # re-asserting the current primary changes nothing
            if out is None:
                return True, (primary, lo, hi, claim)
            epoch = int(out["epoch"])
            if out.get("primary") != member or _narrow(lo, hi, epoch, epoch) is None:
                return False, state
            return True, (primary, epoch, epoch, claim)
        return self._changed(state, member, out, claim)

    @staticmethod
    def _changed(state: PrimaryState, member: str | None, out: dict[str, Any] | None,
                 claim: int) -> tuple[bool, PrimaryState]:
        """`member` became primary at a new epoch (known from `out`, or any greater one)."""
        _, lo, hi, _ = state
        if out is None:
            return True, (member, lo + 1, None, claim)
        epoch = int(out["epoch"])
        # needs a current epoch below the new one
        if out.get("primary") != member or _narrow(lo, hi, high=epoch - 1) is None:
            return False, state
        return True, (member, epoch, epoch, claim)

    def _step_claims(self, state: PrimaryState, op: Operation) -> tuple[bool, PrimaryState]:
        primary, lo, hi, claim = state
        out = op.output
        if op.name == "read":
            if out is None:
                return True, state
            epoch = int(out["epoch"])
            if out.get("primary") != primary or _narrow(lo, hi, epoch, epoch) is None:
                return False, state
            return True, (primary, epoch, epoch, claim)
        if op.name != "set_primary":
            raise ValueError(f"operation {op.id}: name must be set_primary or read, not {op.name!r}")
        member = op.input.get("member")
        token = op.input.get("expected_epoch")
        if out is not None and "rejected" in out:
            # stale: a claim at or below the highest one before (and nothing else refuses)
            return (token is not None and int(token) <= claim), state
        if token is not None:
            if int(token) <= claim:
                return False, state
            claim = int(token)
        if member == primary:  # re-asserting the current primary keeps its epoch
            if out is None:
                return True, (primary, lo, hi, claim)
            epoch = int(out["epoch"])
            if out.get("primary") != member or _narrow(lo, hi, epoch, epoch) is None:
                return False, state
            return True, (primary, epoch, epoch, claim)
        return self._changed(state, member, out, claim)

    def describe(self, state: PrimaryState) -> Any:
        primary, lo, hi, claim = state
        described: dict[str, Any] = {"primary": primary, "epoch": lo if lo == hi else {"min": lo, "max": hi}}
        if self.claims:
            described["claim"] = claim
        return described


# --- the search ---------------------------------------------------------------------------------


class _Entry:
    """A call or return event in a doubly linked list ordered by time."""

    __slots__ = ("is_call", "match", "next", "op", "prev", "slot", "time")

    def __init__(self, op: Operation | None, slot: int, time: float, is_call: bool) -> None:
        self.op = op
        self.slot = slot
        self.time = time
        self.is_call = is_call
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


def _build_list(ops: list[Operation]) -> _Entry:
    events: list[_Entry] = []
    for slot, op in enumerate(ops):
        call = _Entry(op, slot, op.call, True)
        ret = _Entry(op, slot, math.inf if op.unknown or op.ret is None else op.ret, False)
        call.match = ret
        events += [call, ret]
    # At equal times calls come first: the two operations are then treated as concurrent.
    events.sort(key=lambda e: (e.time, not e.is_call, e.slot))
    head = _Entry(None, -1, -math.inf, True)
    prev = head
    for entry in events:
        prev.next = entry
        entry.prev = prev
        prev = entry
    return head


def _lift(call: _Entry) -> None:
    ret = call.match
    assert call.prev is not None and ret is not None and ret.prev is not None
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Entry) -> None:
    ret = call.match
    assert call.prev is not None and ret is not None and ret.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


@dataclass
class KeyResult:
    """The verdict for one key. `ok is None`: the search gave up (budget exhausted)."""

    key: str
    ok: bool | None
    operations: list[Operation]
    linearization: list[int] = field(default_factory=list)  # op ids, in order (ok only)
    longest_prefix: list[int] = field(default_factory=list)  # op ids (not ok)
    stuck: Operation | None = None  # an op that must have completed but could not be placed
    state_after_prefix: Any = None
    explored: int = 0

    def report(self) -> dict[str, Any]:
        by_id = {op.id: op for op in self.operations}
        out: dict[str, Any] = {
            "key": self.key,
            "ok": self.ok,
            "operations": len(self.operations),
            "explored": self.explored,
        }
        if self.ok:
            out["linearization"] = self.linearization
        else:
            if self.ok is None:
                out["reason"] = "search budget exhausted (max_explored): no verdict"
            out["longest_linearizable_prefix"] = [by_id[i].to_json() for i in self.longest_prefix]
            out["state_after_prefix"] = self.state_after_prefix
            if self.stuck is not None:
                out["cannot_place"] = self.stuck.to_json()
                placed = set(self.longest_prefix)
                out["concurrent_unplaced"] = [
                    op.to_json() for op in self.operations
                    if op.id not in placed and op.id != self.stuck.id and _overlaps(op, self.stuck)
                ]
        return out


def _overlaps(a: Operation, b: Operation) -> bool:
    a_end = math.inf if a.unknown or a.ret is None else a.ret
    b_end = math.inf if b.unknown or b.ret is None else b.ret
    return a.call <= b_end and b.call <= a_end


@dataclass
class CheckResult(Generic[S]):
    ok: bool | None
    model: str
    keys: dict[str, KeyResult]

    def report(self) -> dict[str, Any]:
        """JSON-serialisable: the verdict, per key, and every operation of a failing key."""
        failing = [k for k, r in self.keys.items() if r.ok is not True]
        return {
            "ok": self.ok,
            "model": self.model,
            "keys": {k: r.report() for k, r in sorted(self.keys.items())},
            "failing_keys": sorted(failing),
            "history": {k: [op.to_json() for op in self.keys[k].operations] for k in sorted(failing)},
        }


def check_key(key: str, ops: list[Operation], model: Model[S], max_explored: int = 5_000_000) -> KeyResult:
    """Search one key's history. `max_explored` bounds the work (then `ok is None`)."""
    head = _build_list(ops)
    state = model.init()
    linearized = 0
    cache: set[tuple[int, S]] = {(0, state)}
    stack: list[tuple[_Entry, S]] = []
    best: list[int] = []
    best_depth = -1
    best_state: S = state
    stuck: Operation | None = None
    explored = 0
    entry = head.next
    while entry is not None:
        if entry.is_call:
            assert entry.op is not None
            explored += 1
            if explored > max_explored:
                return KeyResult(
                    key, None, ops, longest_prefix=best, stuck=stuck,
                    state_after_prefix=model.describe(best_state), explored=explored,
                )
            ok, new_state = model.step(state, entry.op)
            if ok:
                new_linearized = linearized | (1 << entry.slot)
                if (new_linearized, new_state) not in cache:
                    cache.add((new_linearized, new_state))
                    stack.append((entry, state))
                    state, linearized = new_state, new_linearized
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return: its operation has not been linearized yet.
        assert entry.op is not None
        if entry.op.unknown:
            # Every return still listed is at +inf: every known operation is placed.
            break
        if len(stack) > best_depth:
            # the deepest dead end so far: this prefix cannot be followed by `entry.op`
            best_depth = len(stack)
            best = [e.op.id for e, _ in stack if e.op is not None]
            best_state = state
            stuck = entry.op
        if not stack:
            return KeyResult(
                key, False, ops, longest_prefix=best, stuck=stuck,
                state_after_prefix=model.describe(best_state), explored=explored,
            )
        call, state = stack.pop()
        linearized &= ~(1 << call.slot)
        _unlift(call)
        entry = call.next
    order = [e.op.id for e, _ in stack if e.op is not None]
    return KeyResult(key, True, ops, linearization=order, explored=explored)


def check(history: Iterable[Operation], model: Model[S], max_explored: int = 5_000_000) -> CheckResult[S]:
    """Check a whole history, one key at a time. `ok` is False if any key fails, None if a key's
    search exhausted `max_explored` and none failed."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    seen: set[int] = set()
    for op in history:
        if op.id in seen:
            raise ValueError(f"operation ids must be unique: {op.id} appears twice")
        seen.add(op.id)
        by_key[op.key].append(op)
    keys = {key: check_key(key, ops, model, max_explored) for key, ops in by_key.items()}
    verdicts = [r.ok for r in keys.values()]
    ok: bool | None = False if False in verdicts else (None if None in verdicts else True)
    return CheckResult(ok, model.name, keys)
