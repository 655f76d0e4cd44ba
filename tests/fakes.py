"""In-memory test doubles: FakePlane implements repstage_mesh.api.plane.ControlPlane.

FakePlane applies commands with the real state machine, `repstage_mesh.core.state.apply`; only
Raft is left out (a command commits at the next index at once). Knobs: `fail` (an exception
submit raises, e.g. NoQuorum), `is_ready`, `proxy_list`, `cluster_view`, `peer_answers` (other
nodes' proxies for scope=cluster), `observed` (the members' health for /v1/members).

LiveApi runs the REST API for a FakePlane on a free loopback port in a background thread, for
clients that are synchronous (the CLI, schemathesis). `eventually` waits on a condition with a
deadline (never a bare sleep).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from repstage_mesh.api.app import Operation, bound_port, build_app, start_api
from repstage_mesh.api.cluster import NodeProxies, member_health
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.api.plane import DIRECT, Caller
from repstage_mesh.core.errors import DecisionRefused, Rejected, SnapshotRefused
from repstage_mesh.core.models import (
    Announcement,
    Command,
    MeshState,
    Outcome,
    PutService,
    ServiceSpec,
    SetPrimary,
    SnapshotEntry,
    StartSnapshot,
)
from repstage_mesh.core.state import apply
from repstage_mesh.failover.proxies import Progress


class FakePlane:
    """ControlPlane in memory."""

    def __init__(self, node_id: str = "node-1", services: Iterable[ServiceSpec] = ()):
        self._node_id = node_id
        self._state = MeshState()
        self._registry = CollectorRegistry()
        self._commits = Counter(
            "repstage_fake_commits", "commands applied by the fake plane", registry=self._registry
        )
        self.fail: BaseException | None = None
        self.is_ready = True
        self.proxy_list: list[dict[str, Any]] = []
        self.cluster_view: dict[str, Any] = {
            "leader": node_id,
            "term": 1,
            "peers": [],
            "quorum": True,
        }
        self.peer_answers: list[NodeProxies] = []
        self.observed: dict[str, Any] = {}  # Decider.status()-shaped, `since` against now=100
        self.submitted: list[Command] = []
        self.announcements: list[tuple[str, Announcement]] = []
        for spec in services:
            self._commit(PutService(spec=spec))

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def state(self) -> MeshState:
        return self._state

    def _commit(self, command: Command) -> Outcome:
        self._state, outcome = apply(self._state, command, self._state.index + 1)
        self._commits.inc()
        return outcome

    async def read_state(self, consistent: bool = False) -> MeshState:
        if consistent and self.fail is not None:
            raise self.fail
        return self.state()

    async def submit(self, command: Command, timeout: float = 5.0) -> Outcome:
        self.submitted.append(command)
        if self.fail is not None:
            raise self.fail
        return self._commit(command)

    def proxies(self) -> list[dict[str, Any]]:
        return list(self.proxy_list)

    @property
    def cluster_views(self) -> FakeViews:
        return FakeViews(self)

    async def proxy_progress(self, min_index: int, wait: float) -> Progress:
        return Progress(node_id=self.node_id, satisfied=True, low_water=min_index, connected=0)

    def cluster(self) -> dict[str, Any]:
        return {
            **self.cluster_view,
            "commit_index": self._state.index,
            "applied_index": self._state.index,
        }

    def ready(self) -> bool:
        return self.is_ready

    async def failovers(self, caller: Caller = DIRECT) -> tuple[str, list[dict[str, Any]]]:
        return self.node_id, []

    async def failover(self, record_id: str, caller: Caller = DIRECT) -> dict[str, Any] | None:
        return None

    async def switchover(
        self, service: str, to: str, timeout: float | None,
        wait: float | None = None, caller: Caller = DIRECT,
    ) -> dict[str, Any]:
        # refused the way the real decider refuses (4xx), so that a fuzzer sees no 5xx
        svc = self._state.service(service)
        if svc is None:
            raise DecisionRefused("not_found", f"no service named {service!r}", "service")
        if svc.spec.member(to) is None:
            raise DecisionRefused("not_found", f"{to!r} is not a member of {service!r}", "to")
        raise DecisionRefused("invalid", f"service {service!r} is in follow mode", "service")

    async def announce(self, service: str, announcement: Announcement, caller: Caller = DIRECT) -> dict[str, Any]:
        """Commits the announced primary at once (no plan, no record): the API's view of it."""
        self.announcements.append((service, announcement))
        before = self._state.service(service)
        outcome = await self.submit(SetPrimary(service=service, member=announcement.member,
                                               token=announcement.token, cause=announcement.cause,
                                               by=announcement.by))
        if not outcome.ok and outcome.rejection is not None:
            raise Rejected(outcome.rejection)
        result = outcome.result
        return {"service": service, "primary": result["primary"], "epoch": result["epoch"],
                "previous_primary": before.primary if before else None, "changed": result["changed"],
                "applied_index": self._state.index, "failover": None}


class FakeViews:
    """FakePlane's cluster-wide views: its proxies plus `peer_answers` (other nodes' answers, as
    gathered), and the members' health from `observed` (ages against now=100)."""

    def __init__(self, plane: FakePlane) -> None:
        self.plane = plane

    async def proxies(self, authorization: str | None) -> list[NodeProxies]:
        mine = NodeProxies(self.plane.node_id, "127.0.0.1:0", True, self.plane.proxies())
        return [mine, *self.plane.peer_answers]

    async def members(self, caller: Caller = DIRECT) -> dict[str, Any]:
        rows = member_health(self.plane.state(), self.plane.observed, now=100.0)
        return {"node_id": self.plane.node_id, "leader": True, "members": [r.model_dump() for r in rows]}


class FakeSnapshots:
    """The snapshot endpoints' desk over a FakePlane: commits the intent only (no runner)."""

    def __init__(self, plane: FakePlane) -> None:
        self.plane = plane

    async def start(self, service: str, member: str, caller: Caller = DIRECT) -> dict[str, Any]:
        from repstage_mesh.snapshots.choice import choose_member

        state = self.plane.state()
        svc = state.service(service)
        if svc is None:
            raise SnapshotRefused("not_found", f"no service named {service!r}", "service")
        choice = choose_member(svc, {}, 0, member)
        entry = SnapshotEntry(id=f"snap-{state.index + 1}", service=service, member=choice.member,
                              role=choice.role, epoch=svc.epoch, requested=member)
        outcome = await self.plane.submit(StartSnapshot(entry=entry))
        if not outcome.ok and outcome.rejection is not None:
            raise Rejected(outcome.rejection)
        found = self.plane.state().snapshot(entry.id)
        assert found is not None
        return found.model_dump(mode="json")

    def list(self, service: str) -> list[dict[str, Any]] | None:
        state = self.plane.state()
        if state.service(service) is None:
            return None
        return [s.model_dump(mode="json") for s in reversed(state.snapshots) if s.service == service]

    def get(self, service: str, snapshot_id: str) -> dict[str, Any] | None:
        entry = self.plane.state().snapshot(snapshot_id)
        return entry.model_dump(mode="json") if entry is not None and entry.service == service else None

    async def verify(self, service: str, snapshot_id: str, caller: Caller = DIRECT) -> dict[str, Any]:
        """Commits the drill's start only (no scratch server)."""
        from repstage_mesh.core.models import SnapshotVerification, VerifySnapshot

        entry = self.plane.state().snapshot(snapshot_id)
        if entry is None or entry.service != service:
            raise SnapshotRefused("not_found", f"no snapshot {snapshot_id!r} of {service!r}", "id")
        drill = SnapshotVerification(drill=f"drill-{self.plane.state().index + 1}")
        outcome = await self.plane.submit(VerifySnapshot(id=snapshot_id, verification=drill))
        if not outcome.ok and outcome.rejection is not None:
            raise Rejected(outcome.rejection)
        found = self.plane.state().snapshot(snapshot_id)
        assert found is not None
        return found.model_dump(mode="json")


    async def start_point(self, services: list[str], member: str, caller: Caller = DIRECT) -> dict[str, Any]:
        """The intent only, as the leader's PointRunner commits it first."""
        from repstage_mesh.core.models import HoldEntry, StartHold

        state = self.plane.state()
        entry = HoldEntry(id=f"point-{state.index + 1}", services=tuple(services), window_ms=200)
        outcome = await self.plane.submit(StartHold(entry=entry))
        if not outcome.ok and outcome.rejection is not None:
            raise Rejected(outcome.rejection)
        found = self.plane.state().hold(entry.id)
        assert found is not None
        return found.model_dump(mode="json")

    def points_list(self) -> list[dict[str, Any]]:
        return [h.model_dump(mode="json") for h in reversed(self.plane.state().holds)]

    def point(self, hold_id: str) -> dict[str, Any] | None:
        entry = self.plane.state().hold(hold_id)
        return entry.model_dump(mode="json") if entry is not None else None


def orders_spec(**overrides: Any) -> ServiceSpec:
    data: dict[str, Any] = {
        "name": "orders",
        "protocol": "tcp",
        "listen_port": 15000,
        "read_port": 15001,
        "members": [
            {"name": "a", "address": "127.0.0.1", "port": 9001},
            {"name": "b", "address": "127.0.0.1", "port": 9002},
        ],
        "primary": "a",
    }
    data.update(overrides)
    return ServiceSpec.model_validate(data)


# One proxy as the xDS tracker reports it (xds/tracker.py ProxyRecord.to_dict), with a NACK.
PROXY = {
    "node_id": "envoy-1",
    "cluster": "edge",
    "stream_kind": "delta",
    "control_plane": "node-1",
    "connected": True,
    "synced": True,  # display fixture (the real tracker says False while a NACK stands)
    "snapshot_version": "1000000",
    "types": {
        "cds": {
            "type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "acked_version": "7",
        },
        "lds": {
            "type_url": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "acked_version": "6",
            "nacked_version": "7",
            "error": "duplicate listener port",
        },
    },
}


class LiveApi:
    """The REST API for `plane` on 127.0.0.1:<free port>, served from a background thread."""

    def __init__(
        self,
        plane: FakePlane,
        settings: ApiSettings | None = None,
        extra_operations: Sequence[Operation] = (),
    ) -> None:
        self.plane = plane
        self.extra_operations = extra_operations
        self.settings = settings or ApiSettings(listen="127.0.0.1:0")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="live-api", daemon=True)
        self._runner: Any = None
        self.url = ""

    def __enter__(self) -> LiveApi:
        self._thread.start()
        try:
            future: Future[Any] = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
            self._runner = future.result(timeout=10)
            self.url = f"http://127.0.0.1:{bound_port(self._runner)}"
        except BaseException:
            self._stop_loop()
            raise
        return self

    async def _start(self) -> Any:
        app = build_app(self.plane, self.settings, self.extra_operations)
        return await start_api(app, "127.0.0.1", 0)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's loop (to touch the plane without racing the handlers)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(
                    timeout=10
                )
        finally:
            self._stop_loop()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` (every 10 ms) until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for the IP `host` (PEM files: certificate, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "repstage-test")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "api.crt", directory / "api.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file
