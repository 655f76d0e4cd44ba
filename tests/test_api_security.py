"""Issue 13, what a token may do: nothing beyond its role.

The attacks tried (each gets a 422 naming the field and changes nothing): a read-write token
defining a promotion command or URL, naming an environment variable of the leader as a
password, an IPv6 scope id in a member address. An attacker-controlled Redis (a small asyncio
server) never receives AUTH. Also: named tokens in the audit trail, the Host check without
tokens, body size and JSON depth limits, and coalesced consistent reads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes import FakePlane, eventually, orders_spec, self_signed_cert

from repstage_mesh.api.app import bound_port, build_app, start_api
from repstage_mesh.api.limits import CoalescedReads, json_depth
from repstage_mesh.api.models import ApiSettings
from repstage_mesh.api.peers import PeerClient
from repstage_mesh.config import ApiTls, Secrets, SecretSource
from repstage_mesh.core.models import MeshState, ServiceSpec
from repstage_mesh.core.state import encode_state
from repstage_mesh.sources.probers import make_prober

RAFT_PASSWORD = "raft-password-0123456789"
WRITER = "writer-token-0123456789"
READER = "reader-token-0123456789"
SETTINGS = ApiSettings.model_validate({
    "tokens": [
        {"name": "ci-deploy", "role": "read_write", "token": WRITER},
        {"name": "grafana", "role": "read_only", "token": READER},
    ],
    "hook_names": ["promote-cache"],
    "secret_hosts": {"cache-password": ["10.0.0.5", "10.0.0.6"], "any-host": None},
})
MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
AUTH = {"Authorization": f"Bearer {WRITER}"}


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient[Any, Any]] = []

    async def make(plane: FakePlane, settings: ApiSettings = SETTINGS) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(build_app(plane, settings)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def body(address: str = "127.0.0.1", **leadership: Any) -> dict[str, Any]:
    return {
        "protocol": "redis", "listen_port": 16000,
        "members": [{"name": "a", "address": address, "port": 6379},
                    {"name": "b", "address": "127.0.0.1", "port": 6380}],
        "leadership": {"source": "probe", "mode": "orchestrate", **leadership},
    }


async def refused(client: TestClient[Any, Any], plane: FakePlane, payload: dict[str, Any], field: str) -> str:
    before = encode_state(plane.state())
    resp = await client.put("/v1/services/cache", json=payload, headers=AUTH)
    text = await resp.text()
    assert resp.status == 422, text
    error = json.loads(text)["error"]
    assert error["field"] == field, error
    assert encode_state(plane.state()) == before and plane.submitted == []
    return str(error["message"])


# --- the attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", [
    {"command": ["sh", "-c", "id > /tmp/pwned"]},
    {"url": "http://169.254.169.254/latest/meta-data/"},
])
async def test_a_token_cannot_define_a_hook_command_or_url(make_client: MakeClient, hook: dict[str, Any]) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    message = await refused(client, plane, body(promote_hook=hook), "leadership.promote_hook")
    assert "config file's hooks" in message


async def test_a_token_can_only_name_a_hook_the_operator_defined(make_client: MakeClient) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    await refused(client, plane, body(promote_hook="not-defined"), "leadership.promote_hook")
    resp = await client.put("/v1/services/cache", json=body(promote_hook="promote-cache"), headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert plane.state().services["cache"].spec.leadership.promote_hook == "promote-cache"


async def test_a_token_cannot_name_an_environment_variable_as_a_password(make_client: MakeClient) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    payload = body(probe={"password_env": "REPSTAGE_RAFT__PASSWORD"})
    message = await refused(client, plane, payload, "leadership.probe.password_env")
    assert "secrets" in message


async def test_a_token_cannot_name_an_unknown_secret_or_send_one_to_its_own_host(make_client: MakeClient) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    field = "leadership.probe.password_secret"
    await refused(client, plane, body(probe={"password_secret": "raft-password"}), field)
    message = await refused(client, plane, body(probe={"password_secret": "cache-password"}), field)
    assert "may not be sent" in message


@pytest.mark.parametrize("address", ["fe80::1%$(id)", "fe80::1%eth0", "10.0.0.1;reboot", "a b", "$(id)"])
async def test_a_member_address_is_an_ip_or_a_dns_name_and_nothing_else(
    make_client: MakeClient, address: str,
) -> None:
    plane = FakePlane()
    client = await make_client(plane)
    await refused(client, plane, body(address=address), "members.0.address")


# --- an attacker-controlled Redis never receives AUTH ---------------------------------------------


class FakeRedis:
    """Answers ROLE as a master and records every command it receives (RESP arrays)."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                count = int(line[1:].strip())
                args = []
                for _ in range(count):
                    size = int((await reader.readline())[1:].strip())
                    args.append((await reader.readexactly(size + 2))[:-2].decode())
                self.commands.append(args)
                if args[0].upper() == "ROLE":
                    writer.write(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    def saw(self, name: str) -> bool:
        return any(c and c[0].upper() == name for c in self.commands)


def secrets(monkeypatch: pytest.MonkeyPatch, **sources: SecretSource) -> Secrets:
    monkeypatch.setenv("REPSTAGE_RAFT__PASSWORD", RAFT_PASSWORD)
    monkeypatch.setenv("CACHE_PASSWORD", "cache-secret")
    return Secrets(sources)


async def probe(spec: ServiceSpec, lookup: Secrets) -> None:
    prober = make_prober(spec, spec.members[0], secrets=lookup.for_host)
    try:
        await prober.probe()
    finally:
        await prober.close()


async def test_an_attacker_redis_never_receives_auth(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookup = secrets(monkeypatch, **{"cache-password": SecretSource(env="CACHE_PASSWORD", hosts=("10.0.0.5",))})
    plane = FakePlane()
    client = await make_client(plane)
    async with FakeRedis() as evil:
        attack = body(probe={"password_env": "REPSTAGE_RAFT__PASSWORD"})
        attack["members"][0]["port"] = evil.port
        await refused(client, plane, attack, "leadership.probe.password_env")
        attack["leadership"]["probe"] = {"password_secret": "cache-password"}
        await refused(client, plane, attack, "leadership.probe.password_secret")
        # What a token may do: point a member at its own host without a secret. The prober asks
        # ROLE and sends no AUTH; even a spec that names a secret (as if committed before its
        # hosts were restricted) gets no password for a host the secret does not list.
        del attack["leadership"]["probe"]
        resp = await client.put("/v1/services/cache", json=attack, headers=AUTH)
        assert resp.status == 201, await resp.text()
        await probe(plane.state().services["cache"].spec, lookup)
        naming = ServiceSpec.model_validate({**attack, "name": "cache", "leadership": {
            "source": "probe", "probe": {"password_secret": "cache-password"}}})
        await probe(naming, lookup)
        assert evil.saw("ROLE") and not evil.saw("AUTH"), evil.commands
        assert RAFT_PASSWORD not in json.dumps(evil.commands)


async def test_the_fake_redis_would_see_auth_when_a_secret_is_meant_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for the test above: the same fake records AUTH when it is sent."""
    lookup = secrets(monkeypatch, **{"cache-password": SecretSource(env="CACHE_PASSWORD", hosts=("127.0.0.1",))})
    async with FakeRedis() as redis:
        spec = ServiceSpec.model_validate({**body(), "name": "cache", "leadership": {
            "source": "probe", "probe": {"password_secret": "cache-password"}}})
        spec = spec.model_copy(update={"members": (spec.members[0].model_copy(update={"port": redis.port}),
                                                   spec.members[1])})
        await probe(spec, lookup)
        assert ["AUTH", "cache-secret"] in redis.commands


# --- named tokens and the audit trail -------------------------------------------------------------


async def test_every_write_is_in_the_audit_trail_with_the_token_name(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane)
    resp = await client.post("/v1/services/orders/primary", json={"member": "b"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/services/orders/primary", json={"member": "b"}, headers=AUTH)
    assert resp.status == 200  # a repeat changes nothing and adds no entry
    reader = {"Authorization": f"Bearer {READER}"}
    forbidden = await client.post("/v1/services/orders/primary", json={"member": "a"}, headers=reader)
    assert forbidden.status == 403
    resp = await client.get("/v1/audit", headers=reader)
    assert resp.status == 200
    trail = await resp.json()
    newest = trail["entries"][0]
    assert (newest["actor"], newest["action"], newest["service"]) == ("ci-deploy", "set_primary", "orders")
    assert newest["index"] == plane.state().services["orders"].epoch and "primary b" in newest["detail"]
    assert [e["actor"] for e in trail["entries"]] == ["ci-deploy", "control-plane"]  # the seed


async def test_the_audit_trail_keeps_api_audit_entries(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane, SETTINGS.model_copy(update={"audit_entries": 2}))
    for member in "baba":
        resp = await client.post("/v1/services/orders/primary", json={"member": member}, headers=AUTH)
        assert resp.status == 200
    trail = await (await client.get("/v1/audit", headers=AUTH)).json()
    assert trail["keep"] == 2 and [e["detail"][:9] for e in trail["entries"]] == ["primary a", "primary b"]


def test_the_older_token_shape_still_reads_with_positional_names() -> None:
    settings = ApiSettings.model_validate({"tokens": {"read_write": ["w1-token"], "read_only": ["r1-token"]}})
    assert [(t.name, t.role) for t in settings.tokens.entries()] == [
        ("read-write-1", "read_write"), ("read-only-1", "read_only")]


# --- tokenless loopback: the Host header (DNS rebinding) ------------------------------------------


@pytest.mark.parametrize(("host", "status"), [
    ("localhost:8080", 200), ("127.0.0.1:8080", 200), ("[::1]:8080", 200), ("127.0.0.2", 200),
    ("evil.example.com:8080", 421), ("rebind.attacker.test", 421), ("10.0.0.1:8080", 421),
])
async def test_without_tokens_only_loopback_host_names_are_answered(
    make_client: MakeClient, host: str, status: int,
) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane, ApiSettings())
    before = encode_state(plane.state())
    resp = await client.post("/v1/services/orders/primary", json={"member": "b"}, headers={"Host": host})
    assert resp.status == status, await resp.text()
    if status == 421:
        assert (await resp.json())["error"]["code"] == "misdirected"
        assert encode_state(plane.state()) == before


# --- body size and JSON depth ---------------------------------------------------------------------


async def test_deep_json_is_a_400_not_a_500_and_is_counted(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane)
    deep = "[" * 100_000 + "]" * 100_000
    resp = await client.put("/v1/services/cache", data=deep, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "too_deep"
    metrics = await (await client.get("/metrics")).text()
    assert 'repstage_api_limit_hits_total{limit="json_depth"} 1.0' in metrics


async def test_a_body_over_the_limit_is_a_413_and_is_counted(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane, SETTINGS.model_copy(update={"max_body_bytes": 4096}))
    resp = await client.put("/v1/services/cache", data=b" " * 5000, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    metrics = await (await client.get("/metrics")).text()
    assert 'repstage_api_limit_hits_total{limit="body_bytes"} 1.0' in metrics


def test_json_depth_skips_brackets_inside_strings() -> None:
    assert json_depth(b'{"a": "[[[[[[[[", "b": [1, {"c": "\\"]]]"}]}', 10) == 3
    assert json_depth(b"[" * 50, 10) == 11  # counting stops past the limit


def test_an_unterminated_string_is_skipped_in_one_match_not_one_per_quote() -> None:
    """b'\\"' * N once made the string pattern rescan to the end from every quote (quadratic);
    now the first match runs to the end, so the scan is one linear pass."""
    from repstage_mesh.api.limits import _STRING

    hostile = b'"' + b'\\"' * 10_000 + b"[[["
    match = _STRING.match(hostile)
    assert match is not None and match.end() == len(hostile)
    assert json_depth(hostile, 2) == 0


# --- consistent reads share barriers --------------------------------------------------------------


async def test_consistent_reads_share_barriers_and_each_sees_earlier_writes() -> None:
    barriers: list[asyncio.Event] = []
    state = MeshState()

    async def barrier() -> MeshState:
        gate = asyncio.Event()
        barriers.append(gate)
        await gate.wait()
        return state

    reads = CoalescedReads(barrier, min_interval=0.0)
    async with asyncio.timeout(10):
        first = [asyncio.create_task(reads.read()) for _ in range(50)]
        await eventually(lambda: len(barriers) == 1, "one barrier for 50 concurrent reads")
        later = [asyncio.create_task(reads.read()) for _ in range(50)]  # arrived after it was sent
        await eventually(lambda: reads.waiting == 100, "every read waits")
        barriers[0].set()
        await asyncio.gather(*first)
        assert not any(t.done() for t in later)  # they wait for a barrier sent after they arrived
        await eventually(lambda: len(barriers) == 2, "a second barrier for the later reads")
        barriers[1].set()
        await asyncio.gather(*later)
    assert reads.barriers == 2


async def test_consistent_reads_start_barriers_at_most_once_per_interval() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def barrier() -> MeshState:
        starts.append(loop.time())
        return MeshState()

    limited: list[int] = []
    reads = CoalescedReads(barrier, min_interval=0.05, on_limited=lambda: limited.append(1))
    for _ in range(6):
        await reads.read()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 6 and min(gaps) >= 0.04  # 0.05 apart when started; each runs a bit later
    assert len(limited) >= 5  # each back-to-back read after the first waited (the metric)


async def test_consistent_get_through_the_api_uses_the_shared_barrier(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    calls = 0
    original = plane.read_state

    async def counted(consistent: bool = False) -> MeshState:
        nonlocal calls
        calls += consistent
        return await original(consistent)

    plane.read_state = counted  # type: ignore[method-assign]
    client = await make_client(plane)
    reader = {"Authorization": f"Bearer {READER}"}
    answers = await asyncio.gather(*(client.get("/v1/services?consistent=true", headers=reader) for _ in range(20)))
    assert all(a.status == 200 for a in answers)
    assert 1 <= calls < 20


# --- TLS ------------------------------------------------------------------------------------------


async def test_the_api_serves_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    tls = ApiTls(cert_file=cert, key_file=key, ca_file=cert)
    settings = SETTINGS.model_copy(update={"tls": tls, "listen": "127.0.0.1:0"})
    runner = await start_api(build_app(FakePlane(services=[orders_spec()]), settings))
    try:
        port = bound_port(runner)
        client = PeerClient("cp-2", tls=tls.client_context())
        answer = await client.call(f"127.0.0.1:{port}", "GET", "/v1/services", authorization=f"Bearer {READER}")
        assert answer["services"][0]["name"] == "orders"
        await client.close()
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer
                await session.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        await runner.cleanup()


async def test_an_integral_float_is_an_integer_as_json_schema_says(make_client: MakeClient) -> None:
    plane = FakePlane(services=[orders_spec()])
    client = await make_client(plane)
    current = plane.state().services["orders"].epoch
    resp = await client.post("/v1/services/orders/primary", json={"member": "b", "epoch": float(current + 1)},
                             headers=AUTH)
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/services/orders/primary", json={"member": "a", "epoch": current + 99.5},
                             headers=AUTH)
    assert resp.status == 422 and (await resp.json())["error"]["field"] == "epoch"
