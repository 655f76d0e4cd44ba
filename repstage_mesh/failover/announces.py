"""Announces on the leader: an announced change run as a plan, with idempotency keys.

`Announcer.run(service, announcement)` is what `Node.announce` does when this node leads (a
follower carries the request to the leader first). An idempotency key that is running joins
that run; a key the replicated state remembers (`MeshState.request_keys`) answers from its
record, waiting for nothing and changing nothing; any other request starts a plan through
`FailoverRunner.announce`. The answer is the primary after the change plus its failover record;
a failed plan becomes the domain error its record's `error_code` calls for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from repstage_mesh.core.errors import CommitTimeout, DecisionRefused, NoQuorum, SwitchoverFailed
from repstage_mesh.core.models import Announcement, MeshState
from repstage_mesh.decide import FailoverRecord
from repstage_mesh.failover.runner import FailoverRunner

__all__ = ["Announcer", "raise_failed_announce"]


class Announcer:
    def __init__(
        self,
        runner: FailoverRunner,
        state: Callable[[], MeshState],
        failover: Callable[[str], Awaitable[dict[str, Any] | None]],
        close_wait: float,
    ) -> None:
        self.runner = runner
        self.state = state
        self.failover = failover  # a record from the replicated history, by id
        self.close_wait = close_wait
        self._running: dict[str, asyncio.Future[FailoverRecord]] = {}  # idempotency key -> its run

    async def run(self, service: str, announcement: Announcement) -> dict[str, Any]:
        key = announcement.key
        if key is not None and key in self._running:
            record = await asyncio.shield(self._running[key])
            return self.answer(service, announcement, record.as_dict(), replayed=True)
        if key is not None and (record_id := self.state().request_key(key)) is not None:
            data = await self.failover(record_id)
            if data is None:
                raise DecisionRefused("conflict", f"Idempotency-Key {key!r} was used for record {record_id}, "
                                      "which has left the history; use a new key", "idempotency_key")
            return self.answer(service, announcement, data, replayed=True)
        future: asyncio.Future[FailoverRecord] = asyncio.get_running_loop().create_future()
        if key is not None:
            self._running[key] = future
        try:
            record = await self.runner.announce(
                service, announcement.member, token=announcement.token, cause=announcement.cause,
                fence=announcement.fence, close_wait=self.close_wait, key=key, trace_parent=announcement.trace,
                by=announcement.by,
            )
            future.set_result(record)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            if key is not None:
                self._running.pop(key, None)
        return self.answer(service, announcement, record.as_dict(), replayed=False)

    def answer(self, service: str, announcement: Announcement, record: dict[str, Any],
               *, replayed: bool) -> dict[str, Any]:
        """The API's answer for `record`, the change `announcement` asked for."""
        if record.get("service") != service or record.get("new_primary") != announcement.member:
            raise DecisionRefused(
                "conflict", f"Idempotency-Key {announcement.key!r} was first used to announce "
                f"{record.get('new_primary')!r} for service {record.get('service')!r}; use a new key",
                "idempotency_key")
        if record.get("status") == "failed":
            raise_failed_announce(record)
        state = self.state()
        svc = state.service(service)
        epoch = record.get("epoch")
        return {
            "service": service, "primary": record.get("new_primary"),
            "epoch": int(epoch) if epoch is not None else (svc.epoch if svc else 0),
            "previous_primary": record.get("old_primary"),
            "changed": record.get("old_primary") != record.get("new_primary"),
            "applied_index": state.index, "failover": record, "replayed": replayed,
        }


def raise_failed_announce(record: dict[str, Any]) -> None:
    """The domain error of an announce whose plan failed, by how its commit failed: unknown
    (504), not committed before anything changed (503, or 409 stale_epoch), or failed after the
    fence (409 switchover_failed with the record: the service stays fail-closed)."""
    why = f"announce {record.get('id')} failed: {record.get('reason')}"
    code = record.get("error_code")
    if code == "commit_timeout":
        raise CommitTimeout(why)
    if record.get("fence_epoch") is not None:  # fenced, then failed: something did change
        raise SwitchoverFailed(why, record)
    if code == "no_quorum":
        raise NoQuorum(why)
    if code == "stale_epoch":
        raise DecisionRefused("stale_epoch", why, "epoch")
    raise SwitchoverFailed(why, record)
