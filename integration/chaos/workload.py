"""What runs during the chaos rounds, each in its own thread, everything recorded:

- `DataWriter`: one per Envoy. SETs a new key after another through the Envoy's `cache`
  listener. On each new connection it asks `CLIENT INFO` first: Envoy's tcp_proxy keeps a
  connection on one upstream, and the server's own address (`laddr`) names the member, so each
  acknowledged write is recorded with the member that acknowledged it.
- `ControlWriter`: random `POST /v1/services/ctl/primary` and `GET ...?consistent=true` to a
  random node, recorded for the linearizability checker (outcomes as in
  integration/test_linearizable_history.py), and `GET /v1/failovers` through a random node
  (followers forward it to the leader, one hop): a forwarding loop would answer 508 or hang.
- `PrimaryWatcher`: polls the committed primary of `cache` every ~50 ms (any node: nodes apply
  committed entries only), keeping every (time, primary, epoch) it sees.
"""

from __future__ import annotations

import bisect
import http.client
import random
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Any

import redis

from integration.chaos.mesh import CACHE_PORT, CTL_MEMBERS, ChaosMesh, call
from integration.history import HistoryRecorder

PACING = 0.02  # between one writer's operations (a cadence, not synchronisation)


@dataclass(frozen=True)
class DataWrite:
    writer: int
    key: str
    member: str
    invoked: float
    acked: float


class _Stoppable(threading.Thread):
    pacing = PACING

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.one()
                self.stop_event.wait(self.pacing)
        except BaseException as exc:  # surfaced by the suite
            self.error = exc

    def one(self) -> None:
        raise NotImplementedError


class DataWriter(_Stoppable):
    def __init__(self, index: int, address: str, member_of_ip: dict[str, str]) -> None:
        super().__init__(f"data-{index}")
        self.index = index
        self.address = address
        self.member_of_ip = member_of_ip
        self.acked: list[DataWrite] = []
        self.failures = 0
        self._conn: redis.Connection | None = None
        self._member = ""
        self._n = 0

    def _connect(self) -> None:
        conn = redis.Connection(host=self.address, port=CACHE_PORT, socket_timeout=1.0,
                                socket_connect_timeout=1.0)  # fmt: skip
        conn.connect()
        conn.send_command("CLIENT", "INFO")
        info = conn.read_response()
        text = info.decode() if isinstance(info, bytes) else str(info)
        laddr = dict(p.split("=", 1) for p in text.split() if "=" in p)["laddr"]
        self._member = self.member_of_ip[laddr.rsplit(":", 1)[0]]
        self._conn = conn

    def one(self) -> None:
        try:
            if self._conn is None:
                self._connect()
            assert self._conn is not None
            key = f"w{self.index}-{self._n}"
            self._n += 1
            invoked = time.monotonic()
            self._conn.send_command("SET", key, "1")
            answer = self._conn.read_response()
            if answer in (b"OK", "OK", True):
                self.acked.append(DataWrite(self.index, key, self._member, invoked, time.monotonic()))
        except (redis.RedisError, OSError, KeyError, ValueError):
            self.failures += 1
            if self._conn is not None:
                self._conn.disconnect()
            self._conn = None

    def acked_after(self, t: float) -> DataWrite | None:
        """The first acknowledged write sent at or after `t` (sent times only grow)."""
        acked = self.acked
        i = bisect.bisect_left(acked, t, key=lambda w: w.invoked)
        return acked[i] if i < len(acked) else None


@dataclass
class ControlCounts:
    counts: dict[str, int] = field(default_factory=dict)
    forwarding_loops: int = 0
    unexpected: list[str] = field(default_factory=list)
    acked: list[tuple[float, float]] = field(default_factory=list)  # (invoked, answered) of acked writes

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1


class ControlWriter(_Stoppable):
    pacing = 0.1  # the linearizability search grows with the history: a few operations a second

    def __init__(self, index: int, mesh: ChaosMesh, recorder: HistoryRecorder, seed: int) -> None:
        super().__init__(f"control-{index}")
        self.mesh = mesh
        self.recorder = recorder
        self.random = random.Random(seed)
        self.result = ControlCounts()

    def one(self) -> None:
        node = self.random.choice(self.mesh.nodes)
        roll = self.random.random()
        if roll < 0.1:
            self._failovers(node.api)
            return
        url = f"{node.api}/v1/services/ctl/primary"
        client = f"{self.name}@{node.name}"
        if roll < 0.45:
            op = self.recorder.invoke("ctl", "read", {}, client=client)
            invoked = time.monotonic()
            kind, output = self._call("GET", url + "?consistent=true", None)
        else:
            member = self.random.choice(CTL_MEMBERS)
            op = self.recorder.invoke("ctl", "set_primary", {"member": member, "expected_epoch": None},
                                      client=client)  # fmt: skip
            invoked = time.monotonic()
            kind, output = self._call("POST", url, {"member": member})
            if kind == "ok":
                self.result.acked.append((invoked, time.monotonic()))
        self.result.add(kind)
        if kind == "unknown":
            self.recorder.unknown(op)
        elif kind == "not_applied":
            self.recorder.ok(op, {"not_applied": True})  # dropped before checking
        else:
            self.recorder.ok(op, output)

    def _call(self, method: str, url: str, body: Any) -> tuple[str, dict[str, Any]]:
        try:
            status, answer = call(method, url, body, timeout=7.0)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                return "not_applied", {}
            return "unknown", {}
        except (OSError, http.client.HTTPException):
            return "unknown", {}
        if status == 200:
            return "ok", {"primary": answer["primary"], "epoch": int(answer["epoch"])}
        code = answer.get("error", {}).get("code") if isinstance(answer, dict) else None
        if status == 503 and code in ("no_quorum", "not_ready", "no_leader"):
            return "not_applied", {}
        if status == 504:
            return "unknown", {}
        self.result.unexpected.append(f"{method} {url}: {status} {str(answer)[:200]}")
        return "unknown", {}

    def _failovers(self, api: str) -> None:
        try:
            status, _ = call("GET", f"{api}/v1/failovers", timeout=15.0)
        except TimeoutError:
            self.result.forwarding_loops += 1  # a forwarded read that never came back
            return
        except (OSError, http.client.HTTPException):
            return
        if status == 508:
            self.result.forwarding_loops += 1


class PrimaryWatcher(_Stoppable):
    """`seen`: (asked, answered, primary, epoch) for every answer: the state named was
    committed before `answered`, and was still the state at some time after `asked`."""

    def __init__(self, mesh: ChaosMesh) -> None:
        super().__init__("primary-watcher")
        self.mesh = mesh
        self.seen: list[tuple[float, float, str | None, int]] = []

    def one(self) -> None:
        self.stop_event.wait(0.03)
        asked = time.monotonic()
        found = self.mesh.cache_primary()
        if found is not None:
            self.seen.append((asked, time.monotonic(), *found))
