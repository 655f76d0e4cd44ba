"""Promotion I/O: make a member the primary of the data store, and re-point the others.

Used by failover.py's runner for the decider's `Promote` and `Repoint` steps. Every function
returns a `PromoteResult` (never raises for a database or hook failure) and finishes within the
timeout it is given.

- Redis: `REPLICAOF NO ONE` on the chosen replica (and a ROLE check that it is now master),
  then `REPLICAOF <new> <port>` on every other member; members that cannot be reached (the dead
  old primary) are listed in `failed` and get a `Repoint` when they come back
  (`repoint_old_primary`).
- PostgreSQL: `SELECT pg_promote(wait => false)` on the standby, then `pg_is_in_recovery()` polled
  every 5 ms until it ends (the server-side wait checks only every 100 ms). Timeouts never go
  through psycopg's query cancel (which waits up to 10 s for a silent server): the socket is
  shut down (`_pg_bounded`). Other standbys
  are re-pointed with `ALTER SYSTEM SET primary_conninfo` + `pg_reload_conf()` (they follow the
  new timeline, `recovery_target_timeline` defaults to latest). The old primary is never
  re-joined automatically: it is reported in `needs_rejoin` and stays out of routing until an
  operator (pg_rewind / pg_basebackup) or a hook re-joins it.
- Hooks (`leadership.promote_hook` names one of the config file's `hooks:`; it takes
  precedence over the built-ins): a command run with asyncio's subprocess (no shell; argv
  placeholders {service} {member} {address} {port} {epoch} {old_primary}; exit status 0 =
  promoted; killed with its process group at the timeout) in a minimal environment
  (`config.hook_environment`: an allow-list, the hook's env and secret_env, never a REPSTAGE_*
  variable), or an HTTP POST of JSON {action, service, member, address, port, epoch,
  old_primary} answered 2xx. A hook's output or reply is never stored: the failover record
  (readable with a read-only token) gets the exit status or HTTP status and the reply's length;
  a sanitised excerpt (printable characters, at most 200) goes to the leader's log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import psycopg
import redis.asyncio as aioredis
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from repstage_mesh.config import Secrets, hook_environment
from repstage_mesh.core.models import (
    HookSpec,
    LeadershipSpec,
    Member,
    ProbeKind,
    ServiceProtocol,
    ServiceSpec,
)
from repstage_mesh.decide import PromoteResult
from repstage_mesh.failover.timeouts import bounded
from repstage_mesh.sources.probers import abort_pg_attempt, probe_once

log = logging.getLogger(__name__)

__all__ = [
    "DatabasePromoter",
    "post_http_hook",
    "postgres_promote",
    "postgres_repoint_standby",
    "redis_promote",
    "repoint_old_primary",
    "run_command_hook",
]

_OUTPUT_LIMIT = 64 * 1024  # read at most this much of a hook's output or reply
_EXCERPT = 200  # printable characters of it logged on the leader (never stored)
_T = TypeVar("_T")


def _excerpt(data: bytes) -> str:
    text = data[:_EXCERPT * 4].decode(errors="replace")
    return "".join(c if c.isprintable() else " " for c in text)[:_EXCERPT].strip()


def _redis_client(address: str, port: int, timeout: float, password: str | None,
                  username: str | None) -> aioredis.Redis:
    # no retries: a refused connection (a dead member) must fail at once, not after backoffs
    return aioredis.Redis(
        host=address, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
        password=password, username=username, decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


async def _redis_replicaof(address: str, port: int, master: tuple[str, int] | None, timeout: float,
                           password: str | None = None, username: str | None = None) -> list[Any]:
    """REPLICAOF on one server; returns its ROLE reply afterwards."""
    client = _redis_client(address, port, timeout, password, username)
    try:
        if master is None:
            await client.execute_command("REPLICAOF", "NO", "ONE")
        else:
            await client.execute_command("REPLICAOF", master[0], str(master[1]))
        return list(await client.execute_command("ROLE"))
    finally:
        await client.aclose()


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _quietly(awaitable: Awaitable[object]) -> None:
    with contextlib.suppress(Exception):
        await awaitable


async def redis_promote(
    target: Member,
    others: Sequence[Member],
    timeout: float,
    *,
    password: str | None = None,
    username: str | None = None,
    repoint_timeout: float = 0.5,
    background: Sequence[Member] = (),
) -> PromoteResult:
    """`REPLICAOF NO ONE` on `target`, then `REPLICAOF target` on each of `others` (in parallel,
    at most `repoint_timeout` seconds: the new primary's commit must not wait for a silent old
    primary). ok when the target answers ROLE master; others not re-pointed are listed in
    `failed` (the decider re-points them with Repoint once they are seen following the wrong
    primary or claiming primary)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        role = await bounded(
            _redis_replicaof(target.address, target.port, None, timeout, password, username), timeout
        )
    except (TimeoutError, OSError, aioredis.RedisError) as exc:
        return PromoteResult(False, detail=f"REPLICAOF NO ONE on {target.name}: {exc!r}")
    if not role or role[0] != "master":
        return PromoteResult(False, detail=f"{target.name} answers ROLE {role!r} after REPLICAOF NO ONE")
    remaining = max(0.1, min(repoint_timeout, deadline - loop.time()))
    for member in background:
        # The old primary of a failover is usually dead or silent: re-point it without making
        # the new primary's commit wait (a SIGSTOPped one cost the whole repoint_timeout). If
        # this misses, the decider re-points it when it is seen claiming primary again.
        _BACKGROUND.add(task := loop.create_task(_quietly(bounded(
            _redis_replicaof(member.address, member.port, (target.address, target.port), remaining, password, username),
            remaining))))
        task.add_done_callback(_BACKGROUND.discard)
    results = await asyncio.gather(
        *(bounded(
            _redis_replicaof(m.address, m.port, (target.address, target.port), remaining, password, username),
            remaining) for m in others),
        return_exceptions=True,
    )
    repointed: list[str] = []
    failed: list[str] = []
    notes: list[str] = []
    for member, result in zip(others, results, strict=True):
        if isinstance(result, BaseException):
            failed.append(member.name)
            notes.append(f"{member.name}: {result!r}")
        else:
            repointed.append(member.name)
    detail = f"{target.name} is master (offset {role[1]})"
    if notes:
        detail += "; not re-pointed: " + "; ".join(notes)
    return PromoteResult(True, detail=detail, repointed=tuple(repointed), failed=tuple(failed))


async def repoint_old_primary(
    member: Member,
    new_primary: Member,
    timeout: float,
    *,
    password: str | None = None,
    username: str | None = None,
) -> PromoteResult:
    """Redis: make an old primary that came back a replica of `new_primary`."""
    try:
        role = await bounded(
            _redis_replicaof(member.address, member.port, (new_primary.address, new_primary.port),
                             timeout, password, username),
            timeout,
        )
    except (TimeoutError, OSError, aioredis.RedisError) as exc:
        return PromoteResult(False, detail=f"REPLICAOF on {member.name}: {exc!r}", failed=(member.name,))
    if not role or role[0] != "slave":
        return PromoteResult(False, detail=f"{member.name} answers ROLE {role!r}", failed=(member.name,))
    return PromoteResult(True, detail=f"{member.name} replicates from {new_primary.name}",
                         repointed=(member.name,))


def _pg_conninfo(member: Member, timeout: float, user: str | None, database: str,
                 password: str | None) -> str:
    return make_conninfo(
        host=member.address, port=str(member.port), user=user or "postgres", dbname=database,
        connect_timeout=str(max(1, int(timeout))), password=password,
    )


async def _pg_bounded(
    conninfo: str, timeout: float, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[_T]]
) -> _T:
    """`work` on a fresh autocommit connection, within `timeout` (TimeoutError after it).

    Not `asyncio.timeout` around the queries: cancelling a task inside a query makes psycopg
    send a cancel request and wait for it (up to 10 s against a silent server; psycopg 3.1
    sends it blocking the event loop). At the timeout the socket is shut down
    instead (`sources.probers.abort_pg_attempt`), so the promotion step ends on time and the
    loop keeps serving while a standby is stopped or partitioned."""
    conns: list[psycopg.AsyncConnection[Any]] = []

    async def session() -> _T:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        conns.append(conn)
        async with conn:
            return await work(conn)

    task = asyncio.create_task(session())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await abort_pg_attempt(task, conns[0] if conns else None)
        raise
    if not done:
        await abort_pg_attempt(task, conns[0] if conns else None)
        raise TimeoutError
    return task.result()


async def postgres_promote(
    target: Member,
    timeout: float,
    *,
    user: str | None = None,
    database: str = "postgres",
    password: str | None = None,
) -> PromoteResult:
    """`pg_promote(wait => false)` on a standby, then `pg_is_in_recovery()` every `poll`
    seconds until it is false, within `timeout`. (`wait => true` checks only every 100 ms inside
    the server: ~220 ms measured here against ~30 ms polling.) A member that is already out of
    recovery counts as promoted."""
    poll = 0.005

    async def promote(conn: psycopg.AsyncConnection[Any]) -> PromoteResult | None:
        cur = await conn.execute("SELECT pg_is_in_recovery()")
        row = await cur.fetchone()
        if row is not None and row[0] is False:
            return PromoteResult(True, detail=f"{target.name} is not in recovery: already primary")
        cur = await conn.execute("SELECT pg_promote(wait => false)")
        row = await cur.fetchone()
        if row is None or row[0] is not True:
            return PromoteResult(False, detail=f"pg_promote on {target.name} refused: {row!r}")
        while True:
            cur = await conn.execute("SELECT pg_is_in_recovery()")
            row = await cur.fetchone()
            if row is not None and row[0] is False:
                return None
            await asyncio.sleep(poll)  # polling the end of recovery

    try:
        early = await _pg_bounded(_pg_conninfo(target, timeout, user, database, password), timeout, promote)
    except TimeoutError:
        return PromoteResult(False, detail=f"pg_promote on {target.name} did not finish within {timeout:g} s")
    except (OSError, psycopg.Error) as exc:
        return PromoteResult(False, detail=f"pg_promote on {target.name}: {exc!r}")
    return early or PromoteResult(True, detail=f"{target.name} promoted (pg_promote)")


async def postgres_repoint_standby(
    standby: Member,
    new_primary: Member,
    timeout: float,
    *,
    user: str | None = None,
    database: str = "postgres",
    password: str | None = None,
) -> PromoteResult:
    """Point a streaming standby at `new_primary`: rewrite host/port in its primary_conninfo
    (keeping user, password, application_name...) with ALTER SYSTEM, then pg_reload_conf()."""

    async def repoint(conn: psycopg.AsyncConnection[Any]) -> PromoteResult | None:
        cur = await conn.execute("SELECT pg_is_in_recovery(), current_setting('primary_conninfo')")
        row = await cur.fetchone()
        if row is None or row[0] is not True:
            return PromoteResult(False, detail=f"{standby.name} is not a standby",
                                 needs_rejoin=(standby.name,))
        params = conninfo_to_dict(row[1] or "")
        params.update(host=new_primary.address, port=str(new_primary.port))
        statement = sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
            sql.Literal(make_conninfo("", **params))
        )
        await conn.execute(statement)
        await conn.execute("SELECT pg_reload_conf()")
        return None

    try:
        early = await _pg_bounded(_pg_conninfo(standby, timeout, user, database, password), timeout, repoint)
    except (TimeoutError, OSError, psycopg.Error) as exc:
        return PromoteResult(False, detail=f"re-pointing {standby.name}: {exc!r}", failed=(standby.name,))
    return early or PromoteResult(True, detail=f"{standby.name} follows {new_primary.name}",
                                  repointed=(standby.name,))


def _placeholders(spec: ServiceSpec, member: Member, epoch: int, old_primary: str | None) -> dict[str, str]:
    return {
        "service": spec.name, "member": member.name, "address": member.address,
        "port": str(member.port), "epoch": str(epoch), "old_primary": old_primary or "",
    }


async def run_command_hook(
    argv: Sequence[str], values: Mapping[str, str], timeout: float,
    env: Mapping[str, str] | None = None, *, name: str = "promote_hook",
) -> PromoteResult:
    """Run argv (placeholders substituted) with asyncio's subprocess in environment `env`
    (default: only PATH); exit 0 = success. At the timeout the whole process group is killed."""
    label = f"hook {name!r}"
    try:
        args = [arg.format_map(values) for arg in argv]
    except (KeyError, ValueError, IndexError) as exc:
        return PromoteResult(False, detail=f"{label}: bad placeholder {exc} "
                                           f"(known: {', '.join('{' + k + '}' for k in values)})")
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            env=dict(env) if env is not None else {"PATH": os.defpath},
        )
    except OSError as exc:
        return PromoteResult(False, detail=f"{label}: cannot run {args[0]!r}: {exc.strerror}")
    try:
        output, _ = await bounded(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await bounded(proc.wait(), 5.0)
        return PromoteResult(False, detail=f"{label}: killed after {timeout:g} s")
    log.info("%s exited %s; output (%d bytes): %s", label, proc.returncode, len(output), _excerpt(output))
    summary = f"{label}: exited {proc.returncode} ({len(output)} bytes of output, in the leader's log)"
    return PromoteResult(proc.returncode == 0, detail=summary)


async def post_http_hook(url: str, body: Mapping[str, Any], timeout: float, *,
                         name: str = "promote_hook") -> PromoteResult:
    """POST `body` as JSON; any 2xx answer is success. Redirects are not followed."""
    label = f"hook {name!r}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.post(url, json=dict(body), allow_redirects=False) as response:
            data = await response.content.read(_OUTPUT_LIMIT)
            log.info("%s answered %d (%d bytes): %s", label, response.status, len(data), _excerpt(data))
            summary = f"{label}: answered {response.status} ({len(data)} bytes, in the leader's log)"
            return PromoteResult(200 <= response.status < 300, detail=summary)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return PromoteResult(False, detail=f"{label}: {type(exc).__name__}")


class DatabasePromoter:
    """The `failover.Promoter` the node uses: a hook if the service names one, else Redis or
    PostgreSQL by the service protocol (or probe kind). Credentials come from the probe spec
    (`user`, `database`, and `password_secret` looked up in the operator's `secrets`); hooks
    from the operator's `hooks` (config file), never from the service spec itself."""

    def __init__(self, hooks: Mapping[str, HookSpec] | None = None, secrets: Secrets | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._hooks = dict(hooks or {})
        self._secrets = secrets if secrets is not None else Secrets({})
        self._environ = environ

    def _password(self, lead: LeadershipSpec, *members: Member) -> str | None:
        """The probe's secret, when it may be sent to every one of `members` (its hosts)."""
        name = lead.probe.password_secret
        if name is None or any(self._secrets.for_host(name, m.address) is None for m in members):
            return None
        return self._secrets.get(name)

    def hook_timeout(self, spec: ServiceSpec) -> float | None:
        """The timeout of the hook `spec` names, or None (no hook, or an unknown one)."""
        name = spec.leadership.promote_hook
        hook = self._hooks.get(name) if name is not None else None
        return hook.timeout if hook is not None else None

    @staticmethod
    def _kind(spec: ServiceSpec) -> str | None:
        if spec.protocol is ServiceProtocol.REDIS or spec.leadership.probe.kind is ProbeKind.REDIS:
            return "redis"
        if spec.protocol is ServiceProtocol.POSTGRES or spec.leadership.probe.kind is ProbeKind.POSTGRES:
            return "postgres"
        return None

    async def promote(
        self, spec: ServiceSpec, member: str, old_primary: str | None, epoch: int, timeout: float
    ) -> PromoteResult:
        target = spec.member(member)
        if target is None:
            return PromoteResult(False, detail=f"{member!r} is not a member of {spec.name!r}")
        lead = spec.leadership
        if lead.promote_hook is not None:
            hook = self._hooks.get(lead.promote_hook)
            if hook is None:
                return PromoteResult(False, detail=(
                    f"promote_hook: no hook named {lead.promote_hook!r} in this node's config (hooks:)"))
            return await self._hook(lead.promote_hook, hook, spec, target, epoch, old_primary, timeout)
        kind = self._kind(spec)
        others = [m for m in spec.members if m.name != member]
        password = self._password(lead, *spec.members)
        if kind == "redis":
            waited = [m for m in others if m.name != old_primary]
            later = [m for m in others if m.name == old_primary]
            return await redis_promote(target, waited, timeout, password=password,
                                       username=lead.probe.user, background=later)
        if kind == "postgres":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            result = await postgres_promote(target, timeout, user=lead.probe.user,
                                            database=lead.probe.database, password=password)
            if not result.ok:
                return result
            standbys = [m for m in others if m.name != old_primary]
            remaining = max(0.5, deadline - loop.time())
            repoints = await asyncio.gather(*(
                postgres_repoint_standby(m, target, remaining, user=lead.probe.user,
                                         database=lead.probe.database, password=password)
                for m in standbys
            ))
            return PromoteResult(
                True,
                detail="; ".join([result.detail, *(r.detail for r in repoints)]),
                repointed=tuple(n for r in repoints for n in r.repointed),
                failed=tuple(n for r in repoints for n in r.failed),
                needs_rejoin=tuple(n for n in [old_primary] if n is not None)
                + tuple(n for r in repoints for n in r.needs_rejoin),
            )
        return PromoteResult(False, detail=(
            f"no built-in promotion for protocol {spec.protocol.value!r}: set leadership.promote_hook"
        ))

    async def repoint(
        self, spec: ServiceSpec, member: str, new_primary: str, timeout: float
    ) -> PromoteResult:
        old, new = spec.member(member), spec.member(new_primary)
        if old is None or new is None:
            return PromoteResult(False, detail=f"{member!r} or {new_primary!r} is not a member of {spec.name!r}")
        lead = spec.leadership
        kind = self._kind(spec)
        if kind == "redis":
            return await repoint_old_primary(old, new, timeout, password=self._password(lead, old),
                                             username=lead.probe.user)
        hook = self._hooks.get(lead.promote_hook) if lead.promote_hook is not None else None
        if hook is not None and hook.url:
            body = {"action": "repoint", **_placeholders(spec, old, 0, None), "new_primary": new_primary}
            result = await post_http_hook(hook.url, body, timeout, name=str(lead.promote_hook))
            return PromoteResult(result.ok, result.detail,
                                 repointed=(member,) if result.ok else (), failed=() if result.ok else (member,))
        if kind == "postgres":
            # a standby following the wrong primary can be re-pointed; an old primary cannot
            result = await postgres_repoint_standby(old, new, timeout, user=lead.probe.user,
                                                    database=lead.probe.database,
                                                    password=self._password(lead, old))
            if result.ok or not result.needs_rejoin:
                return result
            return PromoteResult(False, needs_rejoin=(member,), detail=(
                f"{member}: PostgreSQL: an old primary must be re-joined (pg_rewind or "
                "pg_basebackup) by an operator or a hook"))
        why = "no automatic re-join for this service"
        return PromoteResult(False, detail=f"{member}: {why}", needs_rejoin=(member,))

    async def positions(
        self, spec: ServiceSpec, members: Sequence[str], timeout: float
    ) -> dict[str, int | None]:
        """Each member's replication position from one fresh probe (Redis ROLE offset,
        PostgreSQL LSN); None when it cannot be read within `timeout`."""

        async def one(name: str) -> int | None:
            member = spec.member(name)
            if member is None:
                return None
            try:
                result = await bounded(probe_once(spec, member, self._secrets.for_host), timeout)
            except (TimeoutError, OSError):
                return None
            return result.offset if result.succeeded else None

        values = await asyncio.gather(*(one(n) for n in members))
        return dict(zip(members, values, strict=True))

    async def _hook(self, name: str, hook: HookSpec, spec: ServiceSpec, target: Member, epoch: int,
                    old_primary: str | None, timeout: float) -> PromoteResult:
        values = _placeholders(spec, target, epoch, old_primary)
        if hook.command:
            env = hook_environment(hook, self._secrets, self._environ)
            return await run_command_hook(hook.command, values, timeout, env, name=name)
        assert hook.url is not None
        body: dict[str, Any] = {"action": "promote", **values, "port": target.port, "epoch": epoch,
                                "old_primary": old_primary}
        return await post_http_hook(hook.url, body, timeout, name=name)
