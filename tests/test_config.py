"""Configuration: the YAML file, REPSTAGE_* overrides, and an error naming the field for each problem."""

from __future__ import annotations

import re
import socket
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from repstage_mesh.config import (
    ConfigError,
    ServiceConfig,
    default_node_id,
    format_errors,
    load_config,
    parse_host_port,
)
from repstage_mesh.core.errors import MeshError
from repstage_mesh.core.models import ServiceProtocol, ServiceSpec

README = Path(__file__).resolve().parent.parent / "README.md"

GOOD = """
node: {id: cp-2, data_dir: /var/lib/repstage/cp-2}
xds: {listen: "127.0.0.1:18000"}
api:
  listen: "127.0.0.1:8080"
  tokens: {read_write: [writer-token], read_only: [reader-token]}
raft: {bind: "127.0.0.1:7001", peers: ["127.0.0.1:7002", "[::1]:7003"], password: "from-file-0123456789"}
envoy: {listen_address: "0.0.0.0"}
telemetry: {otlp_endpoint: "http://127.0.0.1:4317", service_name: mesh}
consul: {address: "127.0.0.1:8500", token: consul-token, register: false}
services:
  - name: orders
    protocol: redis
    listen_port: 15000
    read_port: 15001
    members:
      - {name: a, address: 127.0.0.1, port: 9001}
      - {name: b, address: 127.0.0.1, port: 9002}
    primary: a
  - name: billing
    protocol: postgres
    listen_port: 15002
    members:
      - {name: pg-1, address: db1.example.com, port: 5432}
"""


def write(tmp_path: Path, text: str, name: str = "repstage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env=env or {})
    return caught.value


def service(name: str = "orders", listen: int = 15000, extra: str = "") -> str:
    return (
        f"  - {{name: {name}, listen_port: {listen}, {extra}"
        "members: [{name: a, address: 127.0.0.1, port: 9001}]}\n"
    )


# --- a good file ------------------------------------------------------------------------------


def test_good_config(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, GOOD), env={})
    assert settings.node.id == "cp-2"
    assert settings.node.data_dir == Path("/var/lib/repstage/cp-2")
    assert settings.host_port("xds.listen") == ("127.0.0.1", 18000)
    assert settings.host_port("api.listen") == ("127.0.0.1", 8080)
    assert settings.host_port("raft.bind") == ("127.0.0.1", 7001)
    assert settings.host_port("raft.peers[1]") == ("::1", 7003)
    assert settings.raft_peers() == [("127.0.0.1", 7002), ("::1", 7003)]
    assert settings.raft.multi_node
    assert settings.raft_password() == "from-file-0123456789"
    assert "from-file-0123456789" not in repr(settings)
    assert settings.api.tokens is not None
    assert settings.api.tokens.role_of("writer-token") == "read_write"
    assert settings.api.tokens.role_of("reader-token") == "read_only"
    assert settings.api.tokens.role_of("other") is None
    assert settings.telemetry.service_name == "mesh"
    assert settings.consul.register_service is False
    assert settings.consul.token is not None
    assert settings.consul.token.get_secret_value() == "consul-token"

    specs = settings.specs()
    assert [s.name for s in specs] == ["orders", "billing"]
    assert all(type(s) is ServiceSpec for s in specs)
    assert specs[0].protocol is ServiceProtocol.REDIS
    assert specs[0].primary == "a"
    assert specs[0].read_port == 15001
    assert specs[1].read_port is None
    assert settings.service("billing") is not None
    assert settings.service("nope") is None


def test_dump_keeps_the_file_layout(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, GOOD), env={})
    dumped = settings.model_dump(mode="json")
    assert dumped["services"][0]["name"] == "orders"
    assert "spec" not in dumped["services"][0]
    assert dumped["consul"]["register"] is False
    assert dumped["raft"]["password"] != "from-file-0123456789"


def test_defaults_without_a_file() -> None:
    settings = load_config(None, env={})
    assert settings.node.id == default_node_id()
    assert settings.node.data_dir == Path(".repstage") / settings.node.id
    assert settings.host_port("xds.listen") == ("127.0.0.1", 18000)
    assert settings.host_port("api.listen") == ("127.0.0.1", 8080)
    assert settings.api.tokens is None
    assert not settings.raft.multi_node
    assert settings.raft_password() is None
    assert settings.envoy.listen_address == "0.0.0.0"
    assert settings.telemetry.otlp_endpoint is None
    assert settings.consul.address is None
    assert settings.consul.register_service is True
    assert settings.services == ()


def test_data_dir_follows_node_id(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, "node: {id: cp-3}\n"), env={})
    assert settings.node.data_dir == Path(".repstage/cp-3")


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, ""), env={})
    assert settings.host_port("xds.listen") == ("127.0.0.1", 18000)


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("web-01", "web-01"), ("Web_01.example.com", "web-01"), ("", "cp-1"), ("---", "cp-1")],
)
def test_default_node_id(monkeypatch: pytest.MonkeyPatch, hostname: str, expected: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert default_node_id() == expected


def test_service_config_takes_new_sections_by_composition() -> None:
    class WithLeadership(ServiceConfig):
        leadership: dict[str, str] = {}

    entry = {
        "name": "orders",
        "listen_port": 15000,
        "members": [{"name": "a", "address": "127.0.0.1", "port": 9001}],
        "leadership": {"source": "consul"},
    }
    parsed = WithLeadership.model_validate(entry)
    assert parsed.leadership == {"source": "consul"}
    assert type(parsed.spec) is ServiceSpec
    assert parsed.spec.name == "orders"
    assert parsed.model_dump(mode="json")["leadership"] == {"source": "consul"}
    assert parsed.model_dump(mode="json")["listen_port"] == 15000


# --- the environment --------------------------------------------------------------------------


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        xds: {listen: "127.0.0.1:18000"}
        raft: {bind: "127.0.0.1:7101", peers: ["127.0.0.1:7102"]}
        """,
    )
    env = {
        "REPSTAGE_RAFT__PASSWORD": "from-env-0123456789",
        "REPSTAGE_XDS__LISTEN": "127.0.0.1:28000",
        "UNRELATED": "x",
    }
    settings = load_config(path, env=env)
    assert settings.raft_password() == "from-env-0123456789"
    assert settings.host_port("xds.listen") == ("127.0.0.1", 28000)
    # The rest of the section still comes from the file.
    assert settings.host_port("raft.bind") == ("127.0.0.1", 7101)
    assert settings.raft.peers == ("127.0.0.1:7102",)


def test_env_overrides_a_value_the_file_sets(tmp_path: Path) -> None:
    path = write(tmp_path, 'raft: {peers: ["127.0.0.1:7002"], password: "file-0123456789abcdef"}\n')
    settings = load_config(path, env={"REPSTAGE_RAFT__PASSWORD": "env-0123456789abcdef"})
    assert settings.raft_password() == "env-0123456789abcdef"


def test_env_lists_are_json_and_names_are_case_insensitive() -> None:
    env = {
        "repstage_raft__peers": '["127.0.0.1:7002"]',
        "REPSTAGE_RAFT__PASSWORD": "pw-0123456789abcdef",
        "REPSTAGE_API__TOKENS__READ_ONLY": '["t1"]',
    }
    settings = load_config(None, env=env)
    assert settings.raft_peers() == [("127.0.0.1", 7002)]
    assert settings.api.tokens is not None
    assert settings.api.tokens.role_of("t1") == "read_only"


def test_os_environ_is_read_when_no_env_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPSTAGE_API__LISTEN", "127.0.0.1:9999")
    assert load_config(None).host_port("api.listen") == ("127.0.0.1", 9999)
    # An explicit mapping replaces os.environ entirely.
    assert load_config(None, env={}).host_port("api.listen") == ("127.0.0.1", 8080)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"REPSTAGE_XDS__LISTEN": "nowhere"})
    assert caught.value.errors == [
        (
            "xds.listen",
            "expected HOST:PORT, got 'nowhere' (from environment variable REPSTAGE_XDS__LISTEN)",
        )
    ]


def test_env_json_that_does_not_parse() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"REPSTAGE_SERVICES": "[not json"})
    assert caught.value.errors[0][0] == "services"
    assert "REPSTAGE_SERVICES" in caught.value.errors[0][1]


# --- one error per problem, each with its field path --------------------------------------------

CASES = [
    ('xds: {listen: "nope"}\n', "xds.listen", "expected HOST:PORT, got 'nope'"),
    ('xds: {listen: "127.0.0.1:0"}\n', "xds.listen", "port from 1 to 65535"),
    ('api: {listen: "bad host:80"}\n', "api.listen", "expected HOST:PORT"),
    (
        'raft: {peers: ["127.0.0.1:7002", "x"], password: p0123456789abcdef}\n',
        "raft.peers[1]",
        "expected HOST:PORT, got 'x'",
    ),
    (
        'raft: {peers: ["127.0.0.1:7002"]}\n',
        "raft.password",
        "set raft.password or REPSTAGE_RAFT__PASSWORD",
    ),
    ('raft: {peers: ["127.0.0.1:7002"], password: ""}\n', "raft.password", "at least 16 characters"),
    ('raft: {peers: ["127.0.0.1:7002"], password: "fifteen-chars-x"}\n', "raft.password", "at least 16 characters"),
    ('raft: {unauthenticated_frame_limit: 100}\n', "raft.unauthenticated_frame_limit", "greater than or equal to 1024"),
    (
        'raft: {bind: "127.0.0.1:7001", peers: ["127.0.0.1:7001"], password: p0123456789abcdef}\n',
        "raft.peers[0]",
        "own raft.bind",
    ),
    (
        'raft: {peers: ["127.0.0.1:7002", "127.0.0.1:7002"], password: p0123456789abcdef}\n',
        "raft.peers[1]",
        "listed twice",
    ),
    ('api: {listen: "127.0.0.1:18000"}\n', "api.listen", "port 18000 is also xds.listen"),
    ('api: {listen: "0.0.0.0:18000"}\n', "api.listen", "also xds.listen"),
    ('raft: {bind: "localhost:8080"}\n', "raft.bind", "also api.listen"),
    (
        "api: {tokens: {read_write: [t], read_only: [u, t]}}\n",
        "api.tokens.read_only[1]",
        "also in read_write",
    ),
    ('envoy: {listen_address: "example.com"}\n', "envoy.listen_address", "expected an IP address"),
    (
        "envoy: {fence_interval_ms: 200, fence_unhealthy_interval_ms: 150}\n",
        "envoy.fence_unhealthy_interval_ms",
        "must be at least fence_interval_ms (200)",
    ),
    ('consul: {address: "ftp://x"}\n', "consul.address", "http(s):// URL"),
    ('consul: {register_address: "0.0.0.0"}\n', "consul.register_address", "HOST:PORT"),
    ('consul: {register_address: "0.0.0.0:8080"}\n', "consul.register_address", "wildcard"),
    ("consul: {deregister_after: 30}\n", "consul.deregister_after", "greater than or equal to 60"),
    ("node: {id: CP_1}\n", "node.id", "should match pattern"),
    ("nodes: {id: cp-1}\n", "nodes", "Extra inputs are not permitted"),
    ("xds: {listen: '127.0.0.1:1', port: 3}\n", "xds.port", "Extra inputs are not permitted"),
    (
        "services:\n"
        "  - name: orders\n"
        "    listen_port: 15000\n"
        "    members:\n"
        "      - {name: a, address: 127.0.0.1, port: 9001}\n"
        "      - {name: b, address: 127.0.0.1, port: 70000}\n",
        "services[0].members[1].port",
        "less than or equal to 65535",
    ),
    (
        "services:\n" + service(extra="primary: z, "),
        "services[0].primary",
        "'z' is not one of the members",
    ),
    ("services:\n" + service(extra="protocol: mysql, "), "services[0].protocol", "'tcp'"),
    ("services:\n" + service(extra="colour: red, "), "services[0].colour", "Extra inputs"),
    ("services:\n" + service(extra="read_port: 15000, "), "services[0].read_port", "must differ"),
    (
        "services:\n  - {name: orders, members: [{name: a, address: 127.0.0.1, port: 9001}]}\n",
        "services[0].listen_port",
        "Field required",
    ),
    (
        "services:\n" + service() + service(listen=15001),
        "services[1].name",
        "duplicate service name 'orders'",
    ),
    (
        "services:\n" + service() + service("billing", 15000),
        "services[1].listen_port",
        "port 15000 is also services[0].listen_port (orders)",
    ),
    (
        "services:\n"
        + service(extra="read_port: 15001, ")
        + service("billing", 15002, "read_port: 15001, "),
        "services[1].read_port",
        "port 15001 is also services[0].read_port",
    ),
]


@pytest.mark.parametrize(("text", "path", "fragment"), CASES, ids=[c[1] for c in CASES])
def test_each_error_names_its_field(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    error = errors_of(tmp_path, text)
    assert [p for p, _ in error.errors] == [path], error.errors
    assert fragment in error.errors[0][1]
    assert f"{path}: " in str(error)


def test_several_problems_are_reported_at_once(tmp_path: Path) -> None:
    error = errors_of(
        tmp_path,
        """
        xds: {listen: "nope"}
        raft: {peers: ["127.0.0.1:7002"]}
        services:
          - {name: orders, listen_port: 15000, members: [{name: a, address: "no such", port: 1}]}
        """,
    )
    paths = [path for path, _ in error.errors]
    assert paths == ["xds.listen", "raft.password", "services[0].members[0].address"]
    text = str(error)
    assert (
        text.splitlines()[0]
        == f"invalid configuration in {tmp_path / 'repstage.yaml'} (3 problems):"
    )
    assert "  xds.listen: expected HOST:PORT, got 'nope'" in text.splitlines()


def test_config_error_is_a_mesh_error() -> None:
    assert issubclass(ConfigError, MeshError)


def test_format_errors() -> None:
    text = format_errors([("a.b", "wrong"), ("", "whole file")], "f.yaml")
    assert text == "invalid configuration in f.yaml (2 problems):\n  a.b: wrong\n  whole file"


# --- the file itself --------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, env={})
    assert caught.value.errors == [("", f"file not found: {missing}")]
    assert str(missing) in str(caught.value)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    error = errors_of(tmp_path, "node: {id: cp-1}\nxds:\n  listen: [oops\napi: {}\n")
    assert len(error.errors) == 1
    path, message = error.errors[0]
    assert path == ""
    assert re.match(r"line \d+, column \d+: ", message), message
    line = int(message.split()[1].rstrip(","))
    assert line in (3, 4)


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    error = errors_of(tmp_path, "xds:\n  listen: '127.0.0.1:1'\n  listen: '127.0.0.1:2'\n")
    assert error.errors == [("", "line 3, column 3: key 'listen' is given twice")]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    error = errors_of(tmp_path, "- just\n- a list\n")
    assert "expected a mapping" in error.errors[0][1]


# --- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:443", ("::1", 443)),
        ("db.local:5432", ("db.local", 5432)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize(
    "value", ["", "80", "host", "host:", ":80", "::1:80", "[::1]", "h:99999", "a b:1"]
)
def test_parse_host_port_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_host_port(value)


def test_host_port_unknown_field() -> None:
    settings = load_config(None, env={})
    for field in ("xds.nope", "raft.peers[0]", "", "api", "xds.listen.x"):
        with pytest.raises(KeyError):
            settings.host_port(field)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        settings.host_port("node.id")


# --- the README's example ---------------------------------------------------------------------


START, END = "<!-- config-example -->", "<!-- /config-example -->"


def example_from(text: str) -> str | None:
    """The ```yaml block between the README's markers; None while the markers are absent."""
    if START not in text or END not in text:
        return None
    block = text.split(START, 1)[1].split(END, 1)[0]
    match = re.search(r"```yaml\n(.*?)```", block, re.DOTALL)
    assert match, "README's config-example markers hold no ```yaml fence"
    return match.group(1)


def test_example_extraction() -> None:
    assert example_from("# RepStage Mesh\n") is None
    text = f"intro\n{START}\nSome words.\n\n```yaml\n{GOOD}```\n{END}\n```yaml\nx: 1\n```\n"
    assert example_from(text) == GOOD


def test_readme_example_config_parses(tmp_path: Path) -> None:
    example = example_from(README.read_text(encoding="utf-8") if README.exists() else "")
    if example is None:
        pytest.skip(f"README.md has no {START} ... {END} markers yet (the lead adds the example)")
    settings = load_config(write(tmp_path, example), env={})
    assert settings.services, "the README example should declare at least one service"


def test_fence_unhealthy_interval_follows_the_fence_interval_unless_set(tmp_path: Path) -> None:
    """Not set: 5 fence intervals, so a slow fence_interval_ms alone never makes a config invalid."""
    slow = load_config(write(tmp_path, "envoy: {fence_interval_ms: 2000}\n"), env={})
    assert slow.envoy.render_options().fence_unhealthy_interval == timedelta(seconds=10)
    assert load_config(None, env={}).envoy.render_options().fence_unhealthy_interval == timedelta(milliseconds=500)
    set_ = load_config(write(tmp_path, "envoy: {fence_interval_ms: 200, fence_unhealthy_interval_ms: 200}\n"), env={})
    assert set_.envoy.render_options().fence_unhealthy_interval == timedelta(milliseconds=200)
