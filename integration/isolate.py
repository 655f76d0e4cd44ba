"""The isolate scenario of issue 14, shared by `test_announce_isolate.py` and
`bench/announce_isolate.py`: one `repstage-mesh serve`, one real Envoy, Redis with a primary and
one replica, a service in announce/follow mode, and a writer through Envoy.

One switch (`switch`): the replica is promoted by hand (REPLICAOF NO ONE) while the old primary
stays up and still says master (nothing re-points it: a split brain the mesh must not feed), then
the new primary is announced with POST /v1/services/cache/primary. Afterwards every acknowledged
write is looked up on both members: with no replication between them any more, a key on the old
primary was acknowledged by it.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from repstage_mesh.cli.workload import RedisWriter

from .databases import RedisGroup, redis_group
from .harness import ControlPlaneNode, Envoy, free_low_port, wait_until, workdir

SERVICE = "cache"


@dataclass
class IsolateRig:
    group: RedisGroup
    cp: ControlPlaneNode
    envoy: Envoy
    port: int

    def primary(self) -> str | None:
        return self.cp.get(f"/v1/services/{SERVICE}")["primary"]  # type: ignore[no-any-return]


@dataclass
class Switch:
    """One announced switch from `old` to `new`, in the writer's clock (time.monotonic)."""

    old: str
    new: str
    sent: float  # POST sent
    answered: float  # POST answered
    status: int
    answer: Any
    first_new: float | None  # the first write acknowledged by the new primary
    old_after_answer: int  # writes acknowledged by the old primary after the POST answered
    acked_after_answer: int

    @property
    def switch_ms(self) -> float | None:
        return None if self.first_new is None else (self.first_new - self.sent) * 1000.0


@contextlib.contextmanager
def isolate_rig(fence_interval_ms: int | None = None) -> Iterator[IsolateRig]:
    with workdir() as wd, redis_group(replicas=1) as group:
        port = free_low_port()
        members = [{"name": n, "address": "127.0.0.1", "port": group.port(n)} for n in group.names]
        cfg: dict[str, Any] = {
            "services": [{
                "name": SERVICE, "protocol": "redis", "listen_port": port, "members": members,
                "primary": "r0", "leadership": {"source": "announce", "mode": "follow"},
            }],
            "envoy": {"listen_address": "127.0.0.1", "fence_port": free_low_port(2)},
        }
        if fence_interval_ms is not None:
            cfg["envoy"]["fence_interval_ms"] = fence_interval_ms
        cp = ControlPlaneNode(wd, cfg)
        envoy = Envoy(wd, "edge-1", [cp.xds_address])
        try:
            cp.start()
            envoy.start()
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            wait_until(lambda: client.set("probe", 1), 20, what="writes through Envoy reach r0")
            yield IsolateRig(group, cp, envoy, port)
        finally:
            envoy.stop()
            cp.stop()


def post_primary(rig: IsolateRig, member: str, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps({"member": member, "cause": "promoted by hand", **(body or {})}).encode()
    req = urllib.request.Request(f"{rig.cp.api}/v1/services/{SERVICE}/primary", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def switch(rig: IsolateRig, writer: RedisWriter, headers: dict[str, str] | None = None,
           after: int = 200) -> Switch:
    """Promote the replica by hand, announce it, keep writing `after` more writes; count."""
    old = rig.primary()
    assert old is not None
    new = next(n for n in rig.group.names if n != old)
    start = len(writer.acked)
    wait_until(lambda: len(writer.acked) > start + 50, 10, what="the writer is writing")
    rig.group.command(new, "REPLICAOF", "NO", "ONE")  # promoted by hand; `old` stays master
    wait_until(lambda: rig.group.role(new)[0] == "master", 5, what=f"{new} promoted")
    sent = time.monotonic()
    status, answer = post_primary(rig, new, headers)
    answered = time.monotonic()
    count = len(writer.acked)
    wait_until(lambda: len(writer.acked) > count + after, 15, what="writes after the switch")
    acked = list(writer.acked)
    window = [(n, at) for n, at in acked if at > sent - 0.5]
    keys = [f"{writer.prefix}{n}" for n, _ in window]
    on_old = rig.group.client(old).mget(keys)
    on_new = rig.group.client(new).mget(keys)
    first_new = min((at for (_, at), o, w in zip(window, on_old, on_new, strict=True)
                     if w is not None and o is None and at > sent), default=None)
    old_after = sum(1 for (_, at), o in zip(window, on_old, strict=True) if o is not None and at > answered)
    return Switch(old, new, sent, answered, status, answer, first_new, old_after,
                  sum(1 for _, at in acked if at > answered))


def rejoin(rig: IsolateRig, old: str, new: str) -> None:
    """Make `old` a replica of `new` again (between runs), and wait until it caught up."""
    rig.group.command(old, "REPLICAOF", "127.0.0.1", str(rig.group.port(new)))
    rig.group.wait_in_sync(new, [old])
