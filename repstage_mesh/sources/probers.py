"""Probers: ask one member of a probe-sourced service whether it is the primary (async I/O).

One prober class per kind, each keeping what makes a 100 ms interval cheap (a Redis or
PostgreSQL connection per member, one aiohttp session for all HTTP probes). `probe()` always
returns a `ProbeResult` within the spec's timeout and never raises:

- redis: `ROLE` on one kept redis.asyncio `Connection` (no pool, no retries of redis-py's own):
  master → PRIMARY with master_repl_offset; slave → REPLICA with the replica's offset and its
  upstream host:port.
- postgres: psycopg async, `pg_is_in_recovery()` and the current (primary) or replayed (standby)
  LSN as an int, the standby's upstream from pg_stat_wal_receiver when readable.
- http: GET path; status == expect_status → PRIMARY, any other answer → REPLICA.
- tcp: connect → UNKNOWN ("up").

A refused connection is REFUSED (the process is gone); a kept connection that breaks (Redis,
PostgreSQL, an HTTP keep-alive connection) is retried once on a fresh one within the same probe,
so a killed member reads as REFUSED, not as a vague error, and REFUSED always means a fresh
connection was refused or closed. No answer within the timeout is TIMEOUT.

`ProbeRunner` (sources/probes.py) runs them on every member's interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import psycopg
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from repstage_mesh.core.models import (
    Member,
    ProbeKind,
    ProbeSpec,
    ServiceProtocol,
    ServiceSpec,
)
from repstage_mesh.core.observations import (
    MemberStatus,
    ProbeOutcome,
    ProbeResult,
    parse_lsn,
)

__all__ = [
    "HttpProber",
    "PostgresProber",
    "Prober",
    "RedisProber",
    "SecretLookup",
    "TcpProber",
    "abort_pg_attempt",
    "make_prober",
    "no_secrets",
    "parse_role_reply",
    "probe_kind",
    "probe_once",
]


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


SecretLookup = Callable[[str | None, str], str | None]  # (secret name, member address)


def no_secrets(name: str | None, host: str) -> str | None:
    """The lookup used when none is given: no password for anyone."""
    return None


def _password(spec: ProbeSpec, member: Member, secrets: SecretLookup) -> str | None:
    """The password named by `password_secret`, from the operator's `secrets:` only, and only
    if that secret may be sent to this member's address (config.Secrets.for_host)."""
    return secrets(spec.password_secret, member.address) if spec.password_secret else None


def _failure(exc: BaseException, started: float) -> ProbeResult:
    latency = time.monotonic() - started
    if isinstance(exc, TimeoutError):
        return ProbeResult.failed(ProbeOutcome.TIMEOUT, "no answer within the timeout", latency)
    if isinstance(exc, ConnectionRefusedError):
        return ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused", latency)
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError)):
        return ProbeResult.failed(ProbeOutcome.REFUSED, f"connection closed: {exc!r}", latency)
    return ProbeResult.failed(ProbeOutcome.ERROR, f"{type(exc).__name__}: {exc}"[:300], latency)


# --- Redis: ROLE over redis.asyncio -----------------------------------------------------------


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


class _WholeErrorReplies(_AsyncRESP2Parser):
    """RESP2, every error reply a plain ResponseError carrying the server's whole line.

    redis-py's own table strips the code from some replies ("LOADING ...") and raises others
    (LOADING, max number of clients, NOAUTH/WRONGPASS) as ConnectionError subclasses, which a
    probe would take for a broken connection and retry. An error reply is an answer: ERROR with
    the server's text, not retried.
    """

    EXCEPTION_CLASSES: dict[str, Any] = {}


# No CLIENT SETINFO on connect (the probe sends ROLE, and AUTH when configured, nothing else):
# redis-py versions with driver_info take driver_info=None (lib_name=None is deprecated there),
# older ones (pyproject allows redis>=5) lib_name=None, lib_version=None.
_NO_CLIENT_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def _redis_failure(exc: BaseException, started: float) -> ProbeResult:
    """A failed ROLE exchange, told apart as `_failure` does. redis-py raises its own
    TimeoutError, and raises its ConnectionError while handling the socket's OSError (the
    refused connect, the reset read): that OSError decides. A ConnectionError with none under it
    is a connection the server closed (end of stream)."""
    if isinstance(exc, RedisTimeoutError):
        return _failure(TimeoutError(), started)
    cause: BaseException | None = exc
    while isinstance(cause, RedisError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return _failure(cause, started)
    if isinstance(exc, RedisConnectionError) and not isinstance(exc, AuthenticationError):
        return ProbeResult.failed(
            ProbeOutcome.REFUSED,
            f"connection closed: {type(exc).__name__}({str(exc)!r})",
            time.monotonic() - started,
        )
    return _failure(exc, started)


class RedisProber:
    """ROLE on one kept connection per member; AUTH first when a password is configured.

    A `redis.asyncio.Connection` rather than a `Redis` client: the probe must know whether a
    connection had been made when a ROLE failed (a connection that broke once made, kept or
    fresh, is retried once on a new one; a connect that failed is not), and a pool hides that.
    redis-py is configured to add nothing: RESP2 (no HELLO), no CLIENT SETINFO, no health-check
    PING, no retries of its own (Retry(NoBackoff(), 0)), a connect timeout at the probe's; the
    whole probe is bounded by `timeout` with asyncio.timeout.
    """

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
        self._conn: Connection | None = None
        self._opened = False  # a TCP connection was made (now or kept from an earlier probe)

    def _connection(self) -> Connection:
        # AUTH [user] password exactly when a password is configured (even an empty one).
        credentials = (
            UsernamePasswordCredentialProvider(self.user, self.password)
            if self.password is not None
            else None
        )
        return Connection(
            host=self.address,
            port=self.port,
            # No socket_timeout: with one, redis-py writes through asyncio.wait_for, which in
            # Python 3.11 can drop a cancellation (the probe task then never stops); the whole
            # probe is bounded by asyncio.timeout instead.
            socket_timeout=None,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            parser_class=_WholeErrorReplies,
            decode_responses=True,
            encoding_errors="replace",
            credential_provider=credentials,
            redis_connect_func=self._handshake,
            **_NO_CLIENT_SETINFO,
        )

    async def _handshake(self, connection: AbstractConnection) -> None:
        self._opened = True  # connected: from here on, a broken connection is retried once
        await connection.on_connect()

    async def _role(self) -> Any:
        if self._conn is None:
            self._conn = self._connection()
            await self._conn.connect()
        await self._conn.send_command("ROLE", check_health=False)
        return await self._conn.read_response()

    async def _ask(self) -> Any:
        try:
            return await self._role()
        except (RedisConnectionError, OSError) as exc:
            if not self._opened or isinstance(exc, AuthenticationError):
                raise  # no connection was made, or AUTH was answered but not with OK
        await self.close()  # a connection broke: ask once more on a fresh one
        return await self._role()

    async def probe(self) -> ProbeResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._ask()
        except ResponseError as exc:  # an error reply: the server answered
            await self.close()
            return ProbeResult.failed(
                ProbeOutcome.ERROR, str(exc)[:300], time.monotonic() - started
            )
        except (TimeoutError, OSError, RedisError, ValueError) as exc:
            await self.close()
            return _redis_failure(exc, started)
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
        self._opened = False
        if conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await conn.disconnect(nowait=True)  # no wait: a stopped peer would keep us waiting


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
        await abort_pg_attempt(task, conn)

    @staticmethod
    def _finish(conn: psycopg.AsyncConnection[Any]) -> None:
        _finish_pg(conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._finish(conn)


def _finish_pg(conn: psycopg.AsyncConnection[Any]) -> None:
    if not conn.closed:
        conn.pgconn.finish()  # no Terminate round trip to wait for


async def abort_pg_attempt(
    task: asyncio.Task[Any], conn: psycopg.AsyncConnection[Any] | None
) -> None:
    """Stop an overdue PostgreSQL exchange (`task`, working on `conn`, None while still
    connecting) without psycopg's cancel request: a task cancelled inside a query makes psycopg
    send the server a cancel request and wait up to 5 s for it and 5 s more for the query to
    end (psycopg 3.1 even sends the request blocking the event loop; 3.2+ uses libpq 17's
    non-blocking cancel or a worker thread), which against a silent server is 10 s lost. Instead the connection's socket is
    shut down: the pending wait fails at once with an OperationalError and nothing is sent. A
    connection attempt is cancelled (psycopg connects cancel-safely). Returns once the task has
    ended (or after 1 s, then cancelled); `conn` is finished."""
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
        _finish_pg(conn)


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
            async with asyncio.timeout(self.timeout):
                status = await self._get()
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

    async def _get(self) -> int:
        """The status of one GET. A kept-alive connection the server had closed is retried once
        on a fresh one by aiohttp itself (idempotent methods, since 3.9: aio-libs/aiohttp#7363),
        so "connection closed" is always a fresh connection's."""
        assert self._session is not None
        async with self._session.get(self.url, allow_redirects=False) as response:
            await response.read()
            return response.status

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
    spec: ServiceSpec,
    member: Member,
    *,
    session: aiohttp.ClientSession | None = None,
    secrets: SecretLookup = no_secrets,
) -> Prober:
    """The prober for one member of a service, per the service's leadership.probe spec.
    `secrets` resolves `password_secret` (config.Secrets.for_host)."""
    probe = spec.leadership.probe
    kind = probe_kind(spec)
    port = probe.port or member.port
    if kind is ProbeKind.REDIS:
        return RedisProber(
            member.address, port, probe.timeout, user=probe.user, password=_password(probe, member, secrets)
        )
    if kind is ProbeKind.POSTGRES:
        return PostgresProber(
            member.address,
            port,
            probe.timeout,
            user=probe.user,
            database=probe.database,
            password=_password(probe, member, secrets),
        )
    if kind is ProbeKind.HTTP:
        return HttpProber(
            member.address,
            port,
            probe.timeout,
            path=probe.path,
            expect_status=probe.expect_status,
            session=session,
        )
    return TcpProber(member.address, port, probe.timeout)


async def probe_once(
    spec: ServiceSpec, member: Member, secrets: SecretLookup = no_secrets
) -> ProbeResult:
    """One probe of one member on a fresh connection (CLI, switchover checks, tests)."""
    prober = make_prober(spec, member, secrets=secrets)
    try:
        return await prober.probe()
    finally:
        await prober.close()
