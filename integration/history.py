"""Recording client histories for the linearizability checker, and re-checking a saved one.

A test harness records every client call with `HistoryRecorder` (thread- and task-safe), saves it
with `save_history`, and checks it with `linearizability.check`. A saved history can be checked
again by hand:

    python -m integration.history history.json        # prints the report; exit 0 ok, 1 not, 2 unknown
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .linearizability import Model, Operation, PrimaryRegister, Register, check

__all__ = ["MODELS", "HistoryRecorder", "load_history", "main", "save_history"]

MODELS: dict[str, Callable[[], Model[Any]]] = {
    "primary-register": PrimaryRegister,
    "register": Register,
}


class HistoryRecorder:
    """Records invocations and their answers with a monotonic clock.

    `invoke` before sending a request, then exactly one of `ok` (the answer is known, even a
    rejection) or `unknown` (timed out, connection lost, 5xx that may have been applied). Calls
    never finished count as unknown.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._next_id = 0
        self._open: dict[int, dict[str, Any]] = {}
        self._done: list[Operation] = []

    def invoke(self, key: str, name: str, input: Mapping[str, Any], client: str = "") -> int:
        with self._lock:
            op_id = self._next_id
            self._next_id += 1
            self._open[op_id] = {
                "id": op_id, "key": key, "name": name, "input": dict(input), "client": client,
                "call": self._clock(),
            }
            return op_id

    def ok(self, op_id: int, output: Mapping[str, Any]) -> None:
        self._finish(op_id, dict(output))

    def unknown(self, op_id: int) -> None:
        self._finish(op_id, None)

    def _finish(self, op_id: int, output: dict[str, Any] | None) -> None:
        now = self._clock()
        with self._lock:
            started = self._open.pop(op_id, None)
            if started is None:
                raise ValueError(f"op_id: {op_id} was not invoked or is already finished")
            self._done.append(Operation(output=output, ret=now, **started))

    def operations(self) -> list[Operation]:
        """Finished operations, plus still-open ones as unknown, ordered by id."""
        with self._lock:
            pending = [Operation(output=None, ret=None, **o) for o in self._open.values()]
            return sorted(self._done + pending, key=lambda o: o.id)


def save_history(path: Path | str, operations: Sequence[Operation], model: str = "primary-register") -> None:
    if model not in MODELS:
        raise ValueError(f"model: must be one of {sorted(MODELS)}, not {model!r}")
    data = {"model": model, "operations": [op.to_json() for op in operations]}
    Path(path).write_text(json.dumps(data, indent=1))


def load_history(path: Path | str) -> tuple[str, list[Operation]]:
    data = json.loads(Path(path).read_text())
    model = data.get("model", "primary-register")
    if model not in MODELS:
        raise ValueError(f"model: must be one of {sorted(MODELS)}, not {model!r}")
    return model, [Operation.from_json(op) for op in data["operations"]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a recorded history for linearizability.")
    parser.add_argument("history", type=Path, help="JSON file written by save_history")
    parser.add_argument("--max-explored", type=int, default=5_000_000, help="search budget per key")
    args = parser.parse_args(argv)
    model_name, operations = load_history(args.history)
    result = check(operations, MODELS[model_name](), args.max_explored)
    json.dump(result.report(), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return {True: 0, False: 1, None: 2}[result.ok]


if __name__ == "__main__":
    sys.exit(main())
