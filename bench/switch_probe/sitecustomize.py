"""Timestamps for bench/switch_acks.py --probe (loaded into the `serve` process through
PYTHONPATH; does nothing unless SWITCH_PROBE_OUT names a file).

Writes one JSON line per event, on the node's monotonic clock: `applied` (a SetPrimary entry
applied by the state machine, on pysyncobj's thread: the commit), `publish_start` /
`publish_end` (`Node._publish`: render and encode), `send` / `ack` (the tracker's records of a
response sent and of its ACK). A bench tool, not part of the package.

`SWITCH_PROBE_NO_PORT_FLIP=1`: an experiment, not a setting: the promoted member keeps its
health-check port (render `_fence_port`), so Envoys keep its host instead of creating a fresh
one (which is checked at once, hence routable at once; kept it waits up to a fence interval).
`SWITCH_PROBE_STATIC_FENCE=1`: another experiment: the fence routes never change (every member
answered 503), so a commit sends the endpoints alone. `SWITCH_PROBE_SPANS=1`: `span` events, how
long the node's record keeping, fact replay, waiters and publish took.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from typing import Any

_OUT = os.environ.get("SWITCH_PROBE_OUT")

if _OUT:
    import repstage_mesh.core.state as _core_state
    import repstage_mesh.node as _node
    from repstage_mesh.xds import tracker as _tracker
    from repstage_mesh.xds.messages import Acked, Send

    _events: list[list[Any]] = []

    def _log(*event: Any) -> None:
        _events.append([time.monotonic(), *event])

    def _dump() -> None:
        with open(f"{_OUT}.{os.getpid()}", "w") as handle:
            for event in _events:
                handle.write(json.dumps(event) + "\n")

    atexit.register(_dump)
    _apply = _core_state.apply

    def apply(state: Any, command: Any, index: int) -> Any:
        result = _apply(state, command, index)
        if type(command).__name__ == "SetPrimary":
            _log("applied", "fence" if command.member is None else "route")
        return result

    _core_state.apply = apply
    _publish = _node.Node._publish

    def publish(self: Any, state: Any) -> None:
        _log("publish_start")
        _publish(self, state)
        _log("publish_end")

    _node.Node._publish = publish  # type: ignore[method-assign]
    _record = _tracker.ProxyTracker.record

    def record(self: Any, stream_id: int, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                _log("send", stream_id, action.type_url.rsplit(".", 1)[-1])
            elif isinstance(action, Acked):
                _log("ack", stream_id, action.type_url.rsplit(".", 1)[-1])
        _record(self, stream_id, actions)

    _tracker.ProxyTracker.record = record  # type: ignore[method-assign]

    # In an xDS worker process: when a change arrives from the node, and the worker's own sends
    # and ACKs (`set_snapshot` in every process; `wsend`/`wack`, before they reach the node as facts).
    from repstage_mesh.xds import cache as _cache
    from repstage_mesh.xds import relay as _relay

    _set_snapshot = _cache.SnapshotCache.set_snapshot

    def set_snapshot(self: Any, *args: Any, **kwargs: Any) -> Any:
        _log("set_snapshot")
        return _set_snapshot(self, *args, **kwargs)

    _cache.SnapshotCache.set_snapshot = set_snapshot  # type: ignore[method-assign]
    _wrecord = _relay.ReportingTracker.record

    def wrecord(self: Any, stream_id: int, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                _log("wsend", stream_id)
            elif isinstance(action, Acked):
                _log("wack", stream_id)
        _wrecord(self, stream_id, actions)

    _relay.ReportingTracker.record = wrecord  # type: ignore[method-assign]

if os.environ.get("SWITCH_PROBE_NO_PORT_FLIP"):  # an experiment: the promoted member keeps its port
    import repstage_mesh.render.envoy as _envoy

    _envoy._fence_port = lambda fence, promotions: fence.fence_port  # type: ignore[assignment]

if os.environ.get("SWITCH_PROBE_STATIC_FENCE"):  # an experiment: the fence routes never change
    import repstage_mesh.render.envoy as _envoy_static

    _envoy_static._fence_key = lambda service: (  # type: ignore[assignment]
        service.name, tuple(_envoy_static._member_names(service)), None)

if _OUT and os.environ.get("SWITCH_PROBE_SPANS"):  # how long the node's own steps take, where
    import repstage_mesh.decide.records as _records
    import repstage_mesh.failover.history as _history
    import repstage_mesh.failover.runner as _runner
    import repstage_mesh.failover.steplog as _steplog
    from repstage_mesh.xds import progress as _progress

    def _timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return inner(*args, **kwargs)
            finally:
                _events.append([start, "span", label, time.monotonic() - start])

        setattr(owner, name, wrapper)

    _timed(_records.FailoverRecord, "as_dict", "as_dict")
    _timed(_history.HistoryPublisher, "changed", "history.changed")
    _timed(_steplog.StepLog, "changed", "steplog.changed")
    _timed(_runner.FailoverRunner, "_changed", "runner._changed")
    _timed(_relay.FactReplay, "apply", "facts.apply")
    _timed(_progress.Waiters, "changed", "waiters.changed")
    _timed(_node.Node, "_flush", "node._flush")
