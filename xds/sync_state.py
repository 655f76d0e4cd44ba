"""What one stream's type is, as the tracker and `/v1/proxies` show it: synced, pending, nacked,
behind, ahead or idle (`type_sync_state`), for an in-process stream (`protocol.py`) or a worker's
stream mirrored in the node (`mirror.py`)."""

from __future__ import annotations

from .cache import set_digest, split_version
from .mirror import StreamMirror
from .protocol import SotwStream, _Stream


def type_sync_state(stream: _Stream | StreamMirror, type_url: str) -> str:
    """'synced', 'pending' (a response is in flight), 'nacked' (the client refused the current
    content and keeps an older one), 'behind' (something newer is not yet sent), 'ahead' (the
    client came back claiming a version newer than this replica's snapshot: nothing is sent to
    it until the snapshot catches up) or 'idle'. A worker's stream (mirror.py): as the worker
    worked it out."""
    if isinstance(stream, StreamMirror):
        return stream.sync_state(type_url)
    state = stream.types.get(type_url)
    if state is None or not state.requested or stream.snapshot is None:
        return "idle"
    if isinstance(stream, SotwStream) and not state.wildcard and not state.names:
        return "idle"  # watches nothing of this type
    if isinstance(stream, SotwStream) and state.floor > stream.snapshot.index and not state.pending:
        return "ahead"
    if state.pending:
        return "pending"
    desired = stream._desired(type_url, state)
    if isinstance(stream, SotwStream):
        selection = stream._selection(type_url, state)
        digest = selection.digest if desired is selection.resources else set_digest(desired.values())
        if state.acked_version and split_version(state.acked_version)[1] == digest:
            return "synced"
        return "nacked" if digest in state.nacked else "behind"
    stale = [n for n, item in desired.items() if state.client_versions.get(n) != item.version]
    extra = [n for n in state.client_versions if n not in desired]
    if not stale and not extra:
        return "synced"
    if all(f"{n}:{desired[n].version}" in state.nacked for n in stale) and not extra:
        return "nacked"
    return "behind"
