"""Timestamps for bench/switch_acks.py --probe (loaded into the `serve` process through
PYTHONPATH; does nothing unless SWITCH_PROBE_OUT names a file).

Writes one JSON line per event, on the node's monotonic clock: `applied` (a SetPrimary entry
applied by the state machine, on pysyncobj's thread: the commit), `publish_start` /
`publish_end` (`Node._publish`: render and encode), `send` / `ack` (the tracker's records of a
response sent and of its ACK). A bench tool, not part of the package.

`SWITCH_PROBE_NO_PORT_FLIP=1`: an experiment, not a setting: the promoted member keeps its
health-check port (render `_fence_port`), so Envoys keep its host instead of creating a fresh
one (which is checked at once, hence routable at once; kept it waits up to a fence interval).
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

if os.environ.get("SWITCH_PROBE_NO_PORT_FLIP"):  # an experiment: the promoted member keeps its port
    import repstage_mesh.render.envoy as _envoy

    _envoy._fence_port = lambda fence, promotions: fence.fence_port  # type: ignore[assignment]
