"""Which proxies do not hold a wait for proxies back, although they are not synced.

A break-before-make change waits until every connected proxy holds the new config, at most
`ack_deadline` seconds. Two kinds of client would make every such wait last its whole
deadline for nothing; they are flagged in `/v1/proxies` (and counted in
`repstage_xds_proxies_flagged`) and not waited for:

- `version_ahead`: a SotW client came back claiming a `version_info` newer than this replica's
  snapshot (e.g. "999999999-x"). Nothing is sent to it while the claim stays ahead (versions
  never go backwards, invariant 4). Once this replica's snapshot is at or after the awaited
  index, the claim is either true (the proxy holds a config at least that new) or false
  (nothing can be done for it): either way there is nothing to wait for. The type counts as
  settled ("ahead" in `protocol.type_sync_state`).
- `never_acked`: the stream's first response went out `never_acked_grace` seconds ago
  (`xds.never_acked_grace`, default 10 s) and it has never ACKed (nor NACKed) anything. A real
  Envoy ACKs its first responses within milliseconds; a proxy that ACKed before and is merely
  slow now is still waited for, up to the deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .mirror import StreamMirror
from .protocol import SotwStream
from .sync_state import type_sync_state

if TYPE_CHECKING:
    from .tracker import ProxyRecord

# A NACKed type is not settled: Envoy keeps its older config (for a fence, it may still route
# to the old primary), so the proxy is waited for until the deadline and recorded as missed.
SETTLED = frozenset({"synced", "idle", "ahead"})
FLAGS = ("version_ahead", "never_acked")


def never_acked(record: ProxyRecord, now: float) -> bool:
    """The grace counts from the stream's first response, not from its connection: an Envoy
    that came back already holding the current config (nothing sent, nothing to ACK) and is
    then sent a change is waited for like any other."""
    first = record.first_sent_at
    if first is None or now - first < record.never_acked_grace:
        return False
    return not any(st.acked_at is not None or st.nacked_at is not None for st in list(record.types.values()))


def _ahead_types(record: ProxyRecord) -> list[str]:
    """The types in state "ahead" (protocol.type_sync_state), without computing what the
    stream would be sent (cheap enough for every scrape of /metrics)."""
    stream, snap = record.stream, record.stream.snapshot
    if isinstance(stream, StreamMirror):  # a worker's stream: the worker worked it out
        return [t for t, st in list(stream.types.items()) if st.sync == "ahead"]
    if not isinstance(stream, SotwStream) or snap is None:
        return []
    return [t for t, st in list(stream.types.items()) if st.requested and st.floor > snap.index and not st.pending]


def version_ahead(record: ProxyRecord) -> bool:
    return bool(_ahead_types(record))


def flags(record: ProxyRecord, now: float) -> dict[str, Any]:
    """The flags as `/v1/proxies` shows them."""
    ahead = _ahead_types(record)
    claimed = record.stream.types[ahead[0]].acked_version if ahead else None
    return {
        "version_ahead": bool(ahead),
        "claimed_version": claimed[:80] if claimed else None,
        "never_acked": record.connected and never_acked(record, now),
    }


def not_awaited(record: ProxyRecord) -> bool:
    """Never ACKed anything, or claims a future version for some types and has the others."""
    if never_acked(record, record.clock()):
        return True
    # A claim from the future settles only the types it was made for: the others must be synced.
    stream = record.stream
    return version_ahead(record) and all(type_sync_state(stream, t) in SETTLED for t in list(stream.types))


def excused(record: ProxyRecord, min_index: int) -> bool:
    """Not waited for at `min_index`, and not counted as an ACK either (see the module doc)."""
    snap = record.stream.snapshot
    if snap is None or snap.index < min_index or not record.connected:
        return False
    return not_awaited(record)
