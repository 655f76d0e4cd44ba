"""Probes: ask each member of a probe-sourced service whether it is the primary (async I/O).

One prober class per kind, each keeping what makes a 100 ms interval cheap (a Redis or
PostgreSQL connection per member, one aiohttp session for all HTTP probes). `probe()` always
returns a `ProbeResult` within the spec's timeout and never raises:

- redis: `ROLE` over a raw RESP exchange (no pool): master → PRIMARY with master_repl_offset;
  slave → REPLICA with the replica's offset and its upstream host:port.
- postgres: psycopg async, `pg_is_in_recovery()` and the current (primary) or replayed (standby)
  LSN as an int, the standby's upstream from pg_stat_wal_receiver when readable.
- http: GET path; status == expect_status → PRIMARY, any other answer → REPLICA.
- tcp: connect → UNKNOWN ("up").

A refused connection is REFUSED (the process is gone); a kept connection that breaks is retried
once on a fresh one within the same probe, so a killed member reads as REFUSED, not as a vague
error. No answer within the timeout is TIMEOUT.

`ProbeRunner` runs the probes of every member of every service whose leadership source is
`probe`, on each service's interval, feeds one `ProbeTracker` per member and hands the
Observations to a callback. Only the Raft leader runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import psycopg

from repstage_mesh.core.errors import MeshError
from repstage_mesh.core.models import (
    LeadershipSource,
    Member,
    ProbeKind,
    ProbeSpec,
    ServiceProtocol,
    ServiceSpec,
    ServiceState,
)
from repstage_mesh.core.observations import (
    MemberStatus,
    Observation,
    ProbeOutcome,
    ProbeResult,
    ProbeTracker,
    parse_lsn,
    specs_with_source,
)

__all__ = [
    "HttpProber",
    "PostgresProber",
    "ProbeRunner",
    "Prober",
    "RedisProber",
    "RespError",
    "TcpProber",
    "make_prober",
    "parse_role_reply",
    "probe_kind",
    "probe_once",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
ObservationCallback = Callable[[Observation], Awaitable[None] | None]


class Prober(Protocol):
    kind: ProbeKind

    async def probe(self) -> ProbeResult: ...

    async def close(self) -> None: ...


def probe_kind(spec: ServiceSpec) -> ProbeKind:
    """The probe kind for a service: the spec's, else from its protocol (http services: tcp)."""
    if spec.leadership.probe.kind is not None:
        return spec.leadership.probe.kind
    return {
        ServiceProtocol.REDIS: ProbeKind.REDIS,
        ServiceProtocol.POSTGRES: ProbeKind.POSTGRES,
    }.get(spec.protocol, ProbeKind.TCP)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _password(spec: ProbeSpec) -> str | None:
    return os.environ.get(spec.password_env) if spec.password_env else None


def _failure(exc: BaseException, started: float) -> ProbeResult:
    latency = time.monotonic() - started
    if isinstance(exc, TimeoutError):
        return ProbeResult.failed(ProbeOutcome.TIMEOUT, "no answer within the timeout", latency)
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused", latency)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
        return ProbeResult.failed(ProbeOutcome.REFUSED, f"connection closed: {exc!r}", latency)
    return ProbeResult.failed(ProbeOutcome.ERROR, f"{type(exc).__name__}: {exc}"[:300], latency)


# --- Redis: ROLE over raw RESP ----------------------------------------------------------------


class RespError(MeshError):
    """An error reply (-ERR ...) from Redis."""


async def _read_resp(reader: asyncio.StreamReader) -> Any:
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [await _read_resp(reader) for _ in range(count)]
    raise RespError(f"unexpected RESP type {kind!r}")


def _command(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


_ROLE = _command("ROLE")


def parse_role_reply(reply: Any) -> ProbeResult:
    """A ROLE reply → an OK ProbeResult (or ERROR for a sentinel or a reply we cannot read).

    master: ["master", offset, [[ip, port, offset], ...]]
    slave:  ["slave", host, port, state, offset]
    """
    if not isinstance(reply, list) or not reply:
        return ProbeResult.failed(ProbeOutcome.ERROR, f"unexpected ROLE reply {reply!r}"[:200])
    role = reply[0]
    if role == "master" and len(reply) >= 3:
        replicas = reply[2] or []
        return ProbeResult.ok(
            MemberStatus.PRIMARY,
            offset=int(reply[1]),
            detail=f"master with {len(replicas)} replicas",
        )
    if role == "slave" and len(reply) >= 5:
        host, port, state, offset = reply[1], int(reply[2]), str(reply[3]), int(reply[4])
        return ProbeResult.ok(
            MemberStatus.REPLICA,
            offset=offset if offset >= 0 else None,
            upstream=f"{host}:{port}",
            detail=f"replica, link {state}",
        )
    return ProbeResult.failed(ProbeOutcome.ERROR, f"role {role!r} cannot serve")


class RedisProber:
    """ROLE on one kept connection per member; AUTH first when a password is configured."""

    kind = ProbeKind.REDIS

    def __init__(
        self,
        address: str,
        port: int,
        timeout: float,
        *,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.address, self.port, self.timeout = address, port, timeout
        self.user, self.password = user, password
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.address, self.port)
        self._conn = (reader, writer)
        if self.password is not None:
            auth = ("AUTH", self.user, self.password) if self.user else ("AUTH", self.password)
            writer.write(_command(*auth))
            await _read_resp(reader)
        return reader, writer

    async def _role(self, fresh: bool) -> Any:
        conn = self._conn if not fresh and self._conn is not None else await self._connect()
        reader, writer = conn
        writer.write(_ROLE)
        await writer.drain()
        return await _read_resp(reader)

    async def probe(self) -> ProbeResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    reply = await self._role(fresh=False)
                except (ConnectionError, asyncio.IncompleteReadError, OSError):
                    if self._conn is None:
                        raise
                    await self.close()  # a kept connection broke: ask once more on a fresh one
                    reply = await self._role(fresh=True)
        except RespError as exc:
            await self.close()
            return ProbeResult.failed(
                ProbeOutcome.ERROR, str(exc)[:300], time.monotonic() - started
            )
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            return _failure(exc, started)
        result = parse_role_reply(reply)
        return ProbeResult(
            result.outcome,
            result.role,
            result.offset,
            result.upstream,
            result.detail,
            time.monotonic() - started,
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()  # no wait_closed: a stopped peer would keep us waiting


# --- PostgreSQL -------------------------------------------------------------------------------

_PG_QUERY = """
SELECT pg_is_in_recovery(),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
       (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver LIMIT 1)
"""


class PostgresProber:
    """pg_is_in_recovery() and the LSN on one kept connection per member (autocommit).

    psycopg answers a cancelled query by sending the server a cancel request and waiting up to
    5 s + 5 s for it, which is exactly wrong for a silent server (and libpq < 17 does it
    blocking the event loop). So the query is never cancelled: at the timeout the connection's
    socket is shut down, the query fails at once with an OperationalError, and the probe is a
    TIMEOUT. Only a connection attempt in progress is cancelled (psycopg connects cancel-safely).
    """

    kind = ProbeKind.POSTGRES

    def __init__(
        self,
        address: str,
        port: int,
        timeout: float,
        *,
        user: str | None = None,
        database: str = "postgres",
        password: str | None = None,
    ) -> None:
        self.address, self.port, self.timeout = address, port, timeout
        self.user = user or "postgres"
        self.database, self.password = database, password
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            host=self.address,
            port=self.port,
            user=self.user,
            dbname=self.database,
            password=self.password,
            connect_timeout=max(2, int(self.timeout + 0.999)),  # libpq's floor; we abort sooner
            autocommit=True,
            application_name="repstage-mesh-probe",
        )
        self._conn = conn
        return conn

    async def _attempt(self) -> tuple[Any, ...] | None:
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                cursor = await conn.execute(_PG_QUERY)
                return await cursor.fetchone()
            except psycopg.OperationalError:
                if self._conn is not conn:  # aborted by the timeout: do not retry
                    raise
                self._finish(conn)  # a kept connection broke: ask once more on a fresh one
        conn = await self._connect()
        cursor = await conn.execute(_PG_QUERY)
        return await cursor.fetchone()

    async def probe(self) -> ProbeResult:
        started = time.monotonic()
        task = asyncio.create_task(self._attempt())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            await self._abort(task)
            raise
        if not done:
            await self._abort(task)
            return _failure(TimeoutError(), started)
        latency = time.monotonic() - started
        try:
            row = task.result()
        except psycopg.OperationalError as exc:
            await self.close()
            text = str(exc).strip()
            if "Connection refused" in text:
                return ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused", latency)
            if "server closed the connection" in text or "terminating connection" in text:
                return ProbeResult.failed(ProbeOutcome.REFUSED, "connection closed", latency)
            return ProbeResult.failed(ProbeOutcome.ERROR, text[:300], latency)
        except (psycopg.Error, OSError) as exc:
            await self.close()
            return _failure(exc, started)
        if row is None:
            return ProbeResult.failed(ProbeOutcome.ERROR, "no row from the role query", latency)
        in_recovery, lsn, upstream = row
        offset = parse_lsn(lsn) if lsn else None
        if in_recovery:
            return ProbeResult.ok(
                MemberStatus.REPLICA,
                offset=offset,
                upstream=upstream,
                detail="in recovery",
                latency=latency,
            )
        return ProbeResult.ok(
            MemberStatus.PRIMARY, offset=offset, detail="not in recovery", latency=latency
        )

    async def _abort(self, task: asyncio.Task[Any]) -> None:
        """Stop an overdue attempt without psycopg's cancel request."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            fd = conn.pgconn.socket
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        else:
            task.cancel()  # still connecting
        await asyncio.wait({task}, timeout=1.0)
        if not task.done():
            task.cancel()
        else:
            with contextlib.suppress(BaseException):
                task.exception()
        if conn is not None:
            self._finish(conn)

    @staticmethod
    def _finish(conn: psycopg.AsyncConnection[Any]) -> None:
        if not conn.closed:
            conn.pgconn.finish()  # no Terminate round trip to wait for

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._finish(conn)


# --- HTTP and TCP -----------------------------------------------------------------------------


class HttpProber:
    """GET http://address:port/path: expect_status → PRIMARY, any other status → REPLICA."""

    kind = ProbeKind.HTTP

    def __init__(
        self,
        address: str,
        port: int,
        timeout: float,
        *,
        path: str = "/primary",
        expect_status: int = 200,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = f"http://{_host(address)}:{port}{path if path.startswith('/') else '/' + path}"
        self.timeout, self.expect_status = timeout, expect_status
        self._session = session
        self._own_session = session is None

    async def probe(self) -> ProbeResult:
        started = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with (
                asyncio.timeout(self.timeout),
                self._session.get(self.url, allow_redirects=False) as response,
            ):
                await response.read()
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            return _failure(exc.os_error, started)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            return ProbeResult.failed(
                ProbeOutcome.REFUSED, f"connection closed: {exc}", time.monotonic() - started
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return _failure(exc, started)
        latency = time.monotonic() - started
        role = MemberStatus.PRIMARY if status == self.expect_status else MemberStatus.REPLICA
        return ProbeResult.ok(role, detail=f"HTTP {status}", latency=latency)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._own_session:
            await session.close()


class TcpProber:
    """Connect and close: up (role unknown) or not."""

    kind = ProbeKind.TCP

    def __init__(self, address: str, port: int, timeout: float) -> None:
        self.address, self.port, self.timeout = address, port, timeout

    async def probe(self) -> ProbeResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.address, self.port)
        except (TimeoutError, OSError) as exc:
            return _failure(exc, started)
        writer.close()
        return ProbeResult.ok(MemberStatus.UNKNOWN, detail="up", latency=time.monotonic() - started)

    async def close(self) -> None:
        return None


def make_prober(
    spec: ServiceSpec, member: Member, *, session: aiohttp.ClientSession | None = None
) -> Prober:
    """The prober for one member of a service, per the service's leadership.probe spec."""
    probe = spec.leadership.probe
    kind = probe_kind(spec)
    if kind is ProbeKind.REDIS:
        return RedisProber(
            member.address, member.port, probe.timeout, user=probe.user, password=_password(probe)
        )
    if kind is ProbeKind.POSTGRES:
        return PostgresProber(
            member.address,
            member.port,
            probe.timeout,
            user=probe.user,
            database=probe.database,
            password=_password(probe),
        )
    if kind is ProbeKind.HTTP:
        return HttpProber(
            member.address,
            member.port,
            probe.timeout,
            path=probe.path,
            expect_status=probe.expect_status,
            session=session,
        )
    return TcpProber(member.address, member.port, probe.timeout)


async def probe_once(spec: ServiceSpec, member: Member) -> ProbeResult:
    """One probe of one member on a fresh connection (CLI, switchover checks, tests)."""
    prober = make_prober(spec, member)
    try:
        return await prober.probe()
    finally:
        await prober.close()


# --- the runner -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """What one member task probes; a change of any field restarts the task."""

    service: str
    member: Member
    kind: ProbeKind
    probe: ProbeSpec


ProberFactory = Callable[[ServiceSpec, Member, aiohttp.ClientSession], Prober]


class ProbeRunner:
    """Probes every member of every probe-sourced service and reports Observations.

        runner = ProbeRunner(on_observation)       # callback: sync or async, called in order
        runner.set_services(state.services.values())
        await runner.start()
        ...
        await runner.stop()

    One asyncio task per member: probe, feed the member's ProbeTracker, deliver what it emits,
    then wait until `interval` after the probe started (a probe that times out is followed by
    the next one at once). `set_services` may be called before or after `start`; it keeps the
    tasks (and their trackers) of members whose target is unchanged. `on_probe(service, member,
    result)`, when given, sees every raw result (metrics: Metrics.observe_probe).
    """

    def __init__(
        self,
        on_observation: ObservationCallback,
        *,
        clock: Clock = time.monotonic,
        offset_refresh: float = 1.0,
        prober_factory: ProberFactory | None = None,
        on_probe: Callable[[str, str, ProbeResult], None] | None = None,
    ) -> None:
        self._on_observation = on_observation
        self._on_probe = on_probe
        self._clock = clock
        self._offset_refresh = offset_refresh
        self._factory: ProberFactory = prober_factory or (
            lambda spec, member, session: make_prober(spec, member, session=session)
        )
        self._specs: dict[tuple[str, str], tuple[_Target, ServiceSpec]] = {}
        self._tasks: dict[tuple[str, str], tuple[_Target, asyncio.Task[None]]] = {}
        self._trackers: dict[tuple[str, str], ProbeTracker] = {}
        self._session: aiohttp.ClientSession | None = None
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def set_services(self, services: Iterable[ServiceState | ServiceSpec]) -> None:
        specs: dict[tuple[str, str], tuple[_Target, ServiceSpec]] = {}
        for spec in specs_with_source(services, LeadershipSource.PROBE):
            kind = probe_kind(spec)
            for member in spec.members:
                specs[(spec.name, member.name)] = (
                    _Target(spec.name, member, kind, spec.leadership.probe),
                    spec,
                )
        self._specs = specs
        if self._running:
            self._reconcile()

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._session = aiohttp.ClientSession()
        self._reconcile()

    async def stop(self) -> None:
        self._running = False
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        self._trackers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def latest(self, service: str, member: str) -> Observation | None:
        """The member's debounced status with the freshest offset seen (None: not established)."""
        tracker = self._trackers.get((service, member))
        return tracker.latest if tracker else None

    def statuses(self, service: str) -> dict[str, Observation]:
        """Every member of `service` whose status is established, with its latest observation."""
        out = {}
        for (svc, member), tracker in self._trackers.items():
            if svc == service and tracker.latest is not None:
                out[member] = tracker.latest
        return out

    def _reconcile(self) -> None:
        for key, (target, task) in list(self._tasks.items()):
            wanted = self._specs.get(key)
            if wanted is None or wanted[0] != target or task.done():
                task.cancel()
                del self._tasks[key]
                self._trackers.pop(key, None)
        for key, (target, spec) in self._specs.items():
            if key in self._tasks:
                continue
            tracker = ProbeTracker(
                target.service,
                target.member.name,
                fall=target.probe.fall,
                rise=target.probe.rise,
                source=f"probe:{target.kind}",
                offset_refresh=self._offset_refresh,
            )
            self._trackers[key] = tracker
            task = asyncio.create_task(
                self._run(target, spec, tracker), name=f"probe {key[0]}/{key[1]}"
            )
            self._tasks[key] = (target, task)

    async def _run(self, target: _Target, spec: ServiceSpec, tracker: ProbeTracker) -> None:
        assert self._session is not None
        prober = self._factory(spec, target.member, self._session)
        interval, timeout = target.probe.interval, target.probe.timeout
        try:
            while True:
                started = self._clock()
                try:
                    async with asyncio.timeout(timeout + 0.5):  # backstop: probers bound themselves
                        result = await prober.probe()
                except TimeoutError:
                    await prober.close()
                    result = ProbeResult.failed(ProbeOutcome.TIMEOUT, "probe overran its timeout")
                if self._on_probe is not None:
                    try:
                        self._on_probe(target.service, target.member.name, result)
                    except Exception:
                        log.exception("probe callback failed")
                observation = tracker.feed(result, self._clock())
                if observation is not None:
                    await self._deliver(observation)
                delay = started + interval - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)  # the probe interval, not a synchronisation
                else:
                    await asyncio.sleep(0)
        finally:
            with contextlib.suppress(Exception):
                await prober.close()

    async def _deliver(self, observation: Observation) -> None:
        try:
            outcome = self._on_observation(observation)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception(
                "observation callback failed for %s/%s", observation.service, observation.member
            )
