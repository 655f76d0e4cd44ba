"""Probes against in-process loopback servers (a tiny RESP server, silent and closed ports) and
the ProbeRunner driven by scripted probers. Real Redis and PostgreSQL: integration/test_sources.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from repstage_mesh.core.models import Member, ProbeKind, ServiceSpec
from repstage_mesh.core.observations import MemberStatus, Observation, ProbeOutcome, ProbeResult
from repstage_mesh.sources.probers import (
    HttpProber,
    RedisProber,
    TcpProber,
    make_prober,
    parse_role_reply,
    probe_once,
)
from repstage_mesh.sources.probes import ProbeRunner


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_parse_role_reply() -> None:
    master = parse_role_reply(
        ["master", 3129659, [["127.0.0.1", "9001", "3129242"], ["127.0.0.1", "9002", "3129543"]]]
    )
    assert (master.outcome, master.role, master.offset, master.upstream) == (
        ProbeOutcome.OK,
        MemberStatus.PRIMARY,
        3129659,
        None,
    )
    assert master.detail == "master with 2 replicas"
    replica = parse_role_reply(["slave", "127.0.0.1", 9000, "connected", 3167038])
    assert (replica.role, replica.offset, replica.upstream) == (
        MemberStatus.REPLICA,
        3167038,
        "127.0.0.1:9000",
    )
    assert "connected" in replica.detail
    connecting = parse_role_reply(["slave", "127.0.0.1", 9000, "connect", -1])
    assert (connecting.role, connecting.offset) == (MemberStatus.REPLICA, None)
    assert parse_role_reply(["sentinel", ["mymaster"]]).outcome is ProbeOutcome.ERROR
    assert parse_role_reply("OK").outcome is ProbeOutcome.ERROR


class RespServer:
    """Answers each ROLE with the next scripted reply (raw RESP bytes); None: stay silent;
    "close": close the connection without answering."""

    def __init__(self, replies: list[bytes | str | None]) -> None:
        self.replies = replies
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if not line.startswith(b"*"):
                    continue
                for _ in range(int(line[1:]) * 2):
                    await reader.readline()
                reply = self.replies.pop(0) if self.replies else None
                if reply is None:
                    await asyncio.sleep(3600)  # silent: a stopped process
                if reply == "close":
                    return
                assert isinstance(reply, bytes)
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


MASTER = b"*3\r\n$6\r\nmaster\r\n:42\r\n*0\r\n"
SLAVE = b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:40\r\n"


async def test_redis_prober_keeps_its_connection() -> None:
    server = RespServer([MASTER, SLAVE, MASTER])
    async with server as port:
        prober = RedisProber("127.0.0.1", port, 0.5)
        try:
            first, second, third = [await prober.probe() for _ in range(3)]
        finally:
            await prober.close()
    assert (first.role, first.offset) == (MemberStatus.PRIMARY, 42)
    assert (second.role, second.offset, second.upstream) == (
        MemberStatus.REPLICA,
        40,
        "127.0.0.1:6379",
    )
    assert third.role is MemberStatus.PRIMARY
    assert server.connections == 1


async def test_redis_prober_retries_a_broken_connection_once() -> None:
    server = RespServer([MASTER, "close", MASTER])
    async with server as port:
        prober = RedisProber("127.0.0.1", port, 0.5)
        try:
            assert (await prober.probe()).role is MemberStatus.PRIMARY
            again = await prober.probe()  # the kept connection closes: a fresh one answers
        finally:
            await prober.close()
    assert again.role is MemberStatus.PRIMARY
    assert server.connections == 2


async def test_redis_prober_retries_once_when_a_fresh_connection_closes() -> None:
    server = RespServer(["close", "close", MASTER])
    async with server as port:
        prober = RedisProber("127.0.0.1", port, 0.5)
        try:
            closed = await prober.probe()  # opened, closed, retried once, closed again
            assert server.connections == 2
            again = await prober.probe()
        finally:
            await prober.close()
    assert closed.outcome is ProbeOutcome.REFUSED and closed.detail.startswith("connection closed")
    assert again.role is MemberStatus.PRIMARY and server.connections == 3


async def test_redis_prober_error_reply_and_auth() -> None:
    server = RespServer([b"+OK\r\n", b"-LOADING Redis is loading the dataset in memory\r\n"])
    async with server as port:
        prober = RedisProber("127.0.0.1", port, 0.5, password="secret")
        try:
            result = await prober.probe()
        finally:
            await prober.close()
    assert result.outcome is ProbeOutcome.ERROR and result.detail.startswith("LOADING")


async def test_refused_and_silent_are_told_apart() -> None:
    refused = await RedisProber("127.0.0.1", closed_port(), 0.5).probe()
    assert refused.outcome is ProbeOutcome.REFUSED and refused.detail == "connection refused"
    async with RespServer([None]) as port:
        prober = RedisProber("127.0.0.1", port, 0.2)
        started = time.monotonic()
        silent = await prober.probe()
        elapsed = time.monotonic() - started
        await prober.close()
    assert silent.outcome is ProbeOutcome.TIMEOUT
    assert 0.15 < elapsed < 2.0  # bounded by the probe timeout (0.2 s)


async def test_tcp_and_http_probers() -> None:
    port = closed_port()
    assert (await TcpProber("127.0.0.1", port, 0.5).probe()).outcome is ProbeOutcome.REFUSED
    http = HttpProber("127.0.0.1", port, 0.5)
    try:
        result = await http.probe()
    finally:
        await http.close()
    assert result.outcome is ProbeOutcome.REFUSED
    async with RespServer([]) as open_port:
        up = await TcpProber("127.0.0.1", open_port, 0.5).probe()
    assert (up.outcome, up.role, up.detail) == (ProbeOutcome.OK, MemberStatus.UNKNOWN, "up")


async def test_probe_once_uses_the_spec() -> None:
    spec = service("orders", "redis", {"a": closed_port()})
    result = await probe_once(spec, spec.members[0])
    assert result.outcome is ProbeOutcome.REFUSED


# --- the runner with scripted probers ---------------------------------------------------------


def service(
    name: str, protocol: str, members: dict[str, int], source: str = "probe", **probe: Any
) -> ServiceSpec:
    return ServiceSpec.model_validate(
        {
            "name": name,
            "protocol": protocol,
            "listen_port": 15000,
            "members": [{"name": m, "address": "127.0.0.1", "port": p} for m, p in members.items()],
            "leadership": {"source": source, "probe": {"interval": 0.01, **probe}},
        }
    )


class ScriptedProber:
    kind = ProbeKind.TCP

    def __init__(self, script: Callable[[int], ProbeResult]) -> None:
        self.script = script
        self.calls = 0
        self.closed = False

    async def probe(self) -> ProbeResult:
        self.calls += 1
        return self.script(self.calls)

    async def close(self) -> None:
        self.closed = True


class Factory:
    def __init__(self, scripts: dict[str, Callable[[int], ProbeResult]]) -> None:
        self.scripts = scripts
        self.made: list[tuple[str, str, ScriptedProber]] = []

    def __call__(self, spec: ServiceSpec, member: Member, session: object) -> ScriptedProber:
        prober = ScriptedProber(self.scripts[member.name])
        self.made.append((spec.name, member.name, prober))
        return prober


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.002)


raw: list[tuple[str, str, ProbeResult]] = []  # every raw result the runner's on_probe saw
Parts = tuple[list[Observation], "Factory", ProbeRunner]


@pytest.fixture
async def runner_parts() -> AsyncIterator[Parts]:
    seen: list[Observation] = []
    raw.clear()
    primary = ProbeResult.ok(MemberStatus.PRIMARY, offset=1)
    factory = Factory(
        {
            "a": lambda n: (
                primary
                if n <= 5
                else ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused")
            ),
            "b": lambda n: ProbeResult.ok(MemberStatus.REPLICA, offset=n),
            "x": lambda n: primary,
        }
    )
    runner = ProbeRunner(
        seen.append,
        prober_factory=factory,
        offset_refresh=3600,
        on_probe=lambda s, m, r: raw.append((s, m, r)),
    )
    try:
        yield seen, factory, runner
    finally:
        await runner.stop()


async def test_runner_delivers_debounced_observations(runner_parts: Parts) -> None:
    seen, factory, runner = runner_parts
    runner.set_services(
        [
            service("orders", "tcp", {"a": 1, "b": 2}),
            service("other", "tcp", {"x": 3}, source="consul"),
        ]
    )
    await runner.start()
    await until(lambda: any(o.member == "a" and o.status is MemberStatus.DOWN for o in seen))
    statuses = [(o.member, o.status) for o in seen]
    assert statuses.count(("a", MemberStatus.PRIMARY)) == 1
    assert statuses.count(("b", MemberStatus.REPLICA)) == 1
    assert {name for _, name, _ in factory.made} == {
        "a",
        "b",
    }  # the consul-sourced service is not probed
    down = next(o for o in seen if o.status is MemberStatus.DOWN)
    assert down.source == "probe:tcp" and down.detail.startswith("refused")
    latest = runner.latest("orders", "b")
    assert (
        latest is not None and latest.offset is not None and latest.offset > 2
    )  # fresh, not emitted
    assert set(runner.statuses("orders")) == {"a", "b"}
    a_results = [r.outcome for s, m, r in raw if (s, m) == ("orders", "a")]
    assert a_results[:5] == [ProbeOutcome.OK] * 5 and ProbeOutcome.REFUSED in a_results


async def test_runner_follows_config_changes(runner_parts: Parts) -> None:
    _seen, factory, runner = runner_parts
    runner.set_services([service("orders", "tcp", {"a": 1, "b": 2})])
    await runner.start()
    await until(lambda: len(factory.made) == 2)
    (_, _, prober_a), (_, _, prober_b) = sorted(factory.made, key=lambda t: t[1])
    # b's probe settings change and a leaves the service: a stops, b restarts, nothing else.
    runner.set_services([service("orders", "tcp", {"b": 2}, fall=5)])
    await until(lambda: prober_a.closed and prober_b.closed and len(factory.made) == 3)
    assert factory.made[-1][1] == "b"
    runner.set_services([])
    await until(lambda: factory.made[-1][2].closed)
    await runner.stop()
    assert not runner.running


async def test_runner_survives_a_failing_async_callback() -> None:
    calls: list[Observation] = []

    async def callback(obs: Observation) -> None:
        calls.append(obs)
        raise RuntimeError("decider hiccup")

    factory = Factory(
        {
            "a": lambda n: (
                ProbeResult.ok(MemberStatus.PRIMARY)
                if n % 20 < 10
                else ProbeResult.failed(ProbeOutcome.TIMEOUT)
            )
        }
    )
    runner = ProbeRunner(callback, prober_factory=factory)
    runner.set_services([service("orders", "tcp", {"a": 1})])
    await runner.start()
    try:
        await until(lambda: len(calls) >= 3)  # up, down, up: the loop kept going
    finally:
        await runner.stop()
    assert [o.status for o in calls[:3]] == [
        MemberStatus.PRIMARY,
        MemberStatus.DOWN,
        MemberStatus.PRIMARY,
    ]


async def test_runner_confirms_a_refusal_without_waiting_the_interval() -> None:
    """A refused probe is followed by the confirming one after retry_interval, not interval;
    two refusals (refused_fall) are DOWN; a timeout is not retried early."""
    seen: list[Observation] = []
    times: list[float] = []
    refused = ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused")

    def script(n: int) -> ProbeResult:
        times.append(time.monotonic())
        return ProbeResult.ok(MemberStatus.PRIMARY) if n == 1 else refused

    runner = ProbeRunner(seen.append, prober_factory=Factory({"a": script}))
    spec = service("orders", "tcp", {"a": 1}, interval=0.5, retry_interval=0.01, rise=1)
    try:
        runner.set_services([spec])
        await runner.start()
        await until(lambda: any(o.status is MemberStatus.DOWN for o in seen))
    finally:
        await runner.stop()
    down = next(o for o in seen if o.status is MemberStatus.DOWN)
    assert down.cause is ProbeOutcome.REFUSED
    assert len(times) >= 3
    assert times[1] - times[0] >= 0.5  # the interval after an answer
    assert times[2] - times[1] < 0.4  # the retry_interval after a refusal, well below 0.5


class HangUpFirst:
    """A loopback HTTP server that closes the first `hang_ups` connections without an answer
    (a kept-alive connection the server dropped) and answers 200 on later ones."""

    def __init__(self, hang_ups: int) -> None:
        self.hang_ups = hang_ups
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if self.connections > self.hang_ups:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def test_http_probe_retries_a_dropped_connection_once_on_a_fresh_one() -> None:
    server = HangUpFirst(hang_ups=1)
    async with server as port:
        http = HttpProber("127.0.0.1", port, 1.0)
        try:
            result = await http.probe()
        finally:
            await http.close()
    assert (result.outcome, result.role) == (ProbeOutcome.OK, MemberStatus.PRIMARY)
    assert server.connections == 2
    server = HangUpFirst(hang_ups=5)
    async with server as port:
        http = HttpProber("127.0.0.1", port, 1.0)
        try:
            result = await http.probe()
        finally:
            await http.close()
    assert result.outcome is ProbeOutcome.REFUSED and "connection closed" in result.detail
    assert server.connections == 2  # one retry, not more


def test_probe_port_replaces_the_member_port_and_fields_are_checked() -> None:
    spec = service("orders", "postgres", {"a": 5432}, kind="http", port=8008, refused_fall=2)
    prober = make_prober(spec, spec.members[0])
    assert isinstance(prober, HttpProber) and prober.url == "http://127.0.0.1:8008/primary"
    for bad in ({"refused_fall": 0}, {"retry_interval": 0}, {"port": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            service("orders", "postgres", {"a": 5432}, **bad)
