"""Configuration: one YAML file plus `REPSTAGE_*` environment variables (pydantic-settings).

Precedence, highest first: keyword arguments to `Settings(...)`, environment variables
(`REPSTAGE_` prefix, `__` between nesting levels: `REPSTAGE_RAFT__PASSWORD`,
`REPSTAGE_API__LISTEN`; lists and mappings as JSON), the YAML file, defaults.

    settings = load_config("repstage.yaml")          # raises ConfigError
    host, port = settings.host_port("xds.listen")
    specs = settings.specs()                           # [ServiceSpec, ...]

Every problem is reported with the path of the field it concerns (`services[0].members[1].port`),
all problems at once. Relative paths (`node.data_dir`) are relative to the working directory.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError
from pydantic_settings.sources.utils import parse_env_vars

from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError, format_errors
from repstage_mesh.core.models import NAME_PATTERN, Name, ServiceSpec
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

__all__ = [
    "ENV_PREFIX",
    "ApiConfig",
    "ApiTokens",
    "ConfigError",
    "ConsulConfig",
    "EnvoyConfig",
    "NodeConfig",
    "RaftConfig",
    "ServiceConfig",
    "Settings",
    "TelemetryConfig",
    "XdsConfig",
    "default_node_id",
    "format_errors",
    "load_config",
    "parse_host_port",
]

ENV_PREFIX = "REPSTAGE_"
ENV_DELIMITER = "__"

ErrorList = list[tuple[str, str]]


# --- field types ------------------------------------------------------------------------------

_WILDCARDS = {"0.0.0.0", "::", ""}


def _host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _ip_address(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None
    return value


def _consul_address(value: str) -> str:
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected HOST:PORT or an http(s):// URL, got {value!r}")
        return value
    try:
        parse_host_port(value)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or an http(s):// URL, got {value!r}") from None
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]
IPAddress = Annotated[str, AfterValidator(_ip_address)]
Secret = Annotated[SecretStr, Field(min_length=1)]


def default_node_id() -> str:
    """The host name's first label made a valid node id, or "cp-1" when it cannot be."""
    try:
        label = socket.gethostname().split(".")[0].lower()
    except OSError:
        label = ""
    label = re.sub(r"[^a-z0-9-]+", "-", label).strip("-")[:63].strip("-")
    return label if re.fullmatch(NAME_PATTERN, label) else "cp-1"


# --- sections ---------------------------------------------------------------------------------


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeConfig(Section):
    id: Name = Field(default_factory=default_node_id, description="this control-plane node's name")
    data_dir: Path = Field(description="Raft journal and snapshots; default ./.repstage/<id>")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = dict(data)
            if data.get("id") in (None, ""):
                data["id"] = default_node_id()
            if data.get("data_dir") in (None, ""):
                data["data_dir"] = Path(".repstage") / str(data["id"])
        return data


class XdsConfig(Section):
    listen: HostPort = "127.0.0.1:18000"


class ApiTokens(Section):
    """Bearer tokens for the REST API. No tokens section: the API needs no token."""

    read_write: tuple[Secret, ...] = ()
    read_only: tuple[Secret, ...] = ()

    @model_validator(mode="after")
    def _disjoint(self) -> ApiTokens:
        writers = {t.get_secret_value() for t in self.read_write}
        problems = [
            f"read_only[{i}]: this token is also in read_write; list it once"
            for i, token in enumerate(self.read_only)
            if token.get_secret_value() in writers
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def role_of(self, token: str) -> str | None:
        """ "read_write", "read_only" or None for an unknown token."""
        if any(t.get_secret_value() == token for t in self.read_write):
            return "read_write"
        if any(t.get_secret_value() == token for t in self.read_only):
            return "read_only"
        return None


class ApiConfig(Section):
    listen: HostPort = "127.0.0.1:8080"
    tokens: ApiTokens | None = None


class RaftConfig(Section):
    """Omit `peers` for a single node. With peers, `password` is required: pysyncobj peers
    exchange pickles, so without it anyone reaching the Raft port can run code."""

    bind: HostPort = "127.0.0.1:7001"
    peers: tuple[HostPort, ...] = ()
    password: Secret | None = None

    @model_validator(mode="after")
    def _cluster(self) -> RaftConfig:
        problems = []
        seen: dict[str, int] = {}
        for i, peer in enumerate(self.peers):
            if peer == self.bind:
                problems.append(
                    f"peers[{i}]: {peer!r} is this node's own raft.bind; list only the others"
                )
            elif peer in seen:
                problems.append(
                    f"peers[{i}]: {peer!r} is listed twice (also raft.peers[{seen[peer]}])"
                )
            seen.setdefault(peer, i)
        if self.peers and self.password is None:
            problems.append(
                "password: required when raft.peers is set (a multi-node cluster); "
                "set raft.password or REPSTAGE_RAFT__PASSWORD"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def multi_node(self) -> bool:
        return bool(self.peers)


class EnvoyConfig(Section):
    """How replicated state is rendered for Envoy. Identical on every control-plane node."""

    listen_address: IPAddress = Field(
        default="0.0.0.0", description="where rendered listeners bind"
    )
    primary_strategy: PrimaryStrategy = Field(
        default=PrimaryStrategy.HEALTH_FENCE,
        description="how open connections to a demoted primary are closed (see bench/close_on_switch.md)",
    )
    fence_port: Annotated[int, Field(ge=1, le=65534)] = Field(
        default=15990,
        description="health_fence: two loopback ports on each Envoy, fence_port and fence_port + 1, for the fence listeners",
    )
    fence_interval_ms: int = Field(
        default=100, ge=10, le=10_000,
        description="health_fence: how often Envoy re-checks who the primary is; bounds how long an open connection to a demoted primary survives",
    )

    def render_options(self, telemetry: TelemetryConfig | None = None) -> RenderOptions:
        """`telemetry` with envoy_tracing on adds Envoy's OpenTelemetry tracer to HTTP listeners
        and the collector's cluster."""
        interval = timedelta(milliseconds=self.fence_interval_ms)
        collector = telemetry.envoy_collector() if telemetry is not None else None
        return RenderOptions(
            bind_address=self.listen_address,
            primary_strategy=self.primary_strategy,
            fence_port=self.fence_port,
            fence_interval=interval,
            fence_timeout=min(timedelta(seconds=1), interval * 10),
            tracing_collector_cluster=ENVOY_COLLECTOR_CLUSTER if collector is not None else None,
            tracing_collector_address=collector,
            tracing_sampling_percent=telemetry.envoy_sampling_percent if telemetry is not None else 100.0,
        )


ENVOY_COLLECTOR_CLUSTER = "repstage-otel-collector"


def _collector_host_port(value: str) -> tuple[str, int]:
    """HOST:PORT or http://HOST:PORT of a plaintext OTLP/gRPC collector, as Envoy reaches it."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme != "http" or parts.path not in ("", "/") or parts.query:
            raise ValueError(
                f"Envoy exports spans over plaintext gRPC: give HOST:PORT or http://HOST:PORT, got {value!r}"
            )
        value = parts.netloc
    return parse_host_port(value)


class TelemetryConfig(Section):
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP gRPC endpoint; None: no export"
    )
    service_name: str = Field(default="repstage-mesh", min_length=1)
    envoy_tracing: bool = Field(
        default=False,
        description="HTTP services: Envoy's own OpenTelemetry tracer in the rendered "
        "http_connection_manager, exporting to envoy_otlp_endpoint (default otlp_endpoint); the "
        "collector's cluster is sent to Envoy over CDS",
    )
    envoy_otlp_endpoint: str | None = Field(
        default=None,
        description="HOST:PORT (or http://HOST:PORT) where Envoy reaches the collector, if not otlp_endpoint",
    )
    envoy_sampling_percent: float = Field(
        default=100.0, ge=0.0, le=100.0,
        description="share of requests without an incoming sampling decision that Envoy traces",
    )

    @model_validator(mode="after")
    def _envoy(self) -> TelemetryConfig:
        self.envoy_collector()
        return self

    def envoy_collector(self) -> tuple[str, int] | None:
        """(host, port) of the collector Envoy exports to; None when envoy_tracing is off.
        Only the config file counts (not OTEL_* variables): every node must render the same."""
        if not self.envoy_tracing:
            return None
        field, value = (
            ("envoy_otlp_endpoint", self.envoy_otlp_endpoint)
            if self.envoy_otlp_endpoint is not None
            else ("otlp_endpoint", self.otlp_endpoint)
        )
        if value is None:
            raise ValueError(
                "envoy_tracing: needs telemetry.otlp_endpoint or telemetry.envoy_otlp_endpoint "
                "(the collector Envoy exports spans to)"
            )
        try:
            return _collector_host_port(value.strip())
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None


class ConsulConfig(Section):
    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    address: Annotated[str, AfterValidator(_consul_address)] | None = None
    token: Secret | None = None
    # `register` in the file; a field of that name would shadow BaseModel.register (ABCMeta).
    register_service: bool = Field(default=True, alias="register")


class ServiceConfig(Section):
    """One entry of `services:`: the domain's ServiceSpec plus per-service config sections.

    In the file the spec's fields sit flat at the entry's top level, next to sections that are
    not part of the spec (a `leadership:` section is to come). Add such sections as fields here;
    every other key goes to the spec.
    """

    spec: ServiceSpec

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "spec" not in data:
            own = {k: v for k, v in data.items() if k in cls.model_fields}
            spec = {k: v for k, v in data.items() if k not in cls.model_fields}
            return {**own, "spec": spec}
        return data

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = dict(handler(self))
        return {**data.pop("spec"), **data}

    @property
    def name(self) -> str:
        return self.spec.name


# --- the settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    file_data: Mapping[str, Any]
    env: Mapping[str, str] | None


_INPUTS: ContextVar[_Inputs | None] = ContextVar("repstage_config_inputs", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """The parsed YAML file (set by load_config)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        inputs = _INPUTS.get()
        return (inputs.file_data.get(field_name) if inputs else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        inputs = _INPUTS.get()
        return dict(inputs.file_data) if inputs else {}


class _EnvSource(EnvSettingsSource):
    """Environment variables from the mapping given to load_config, else os.environ."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        inputs = _INPUTS.get()
        if inputs is not None and inputs.env is not None:
            self.env_vars = parse_env_vars(
                inputs.env, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
            )


_PATH_PART = re.compile(r"([a-z_][a-z0-9_]*)((?:\[\d+\])*)")


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_config`; `Settings()` reads os.environ only."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    node: NodeConfig = Field(default_factory=lambda: NodeConfig.model_validate({}))
    xds: XdsConfig = Field(default_factory=XdsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    raft: RaftConfig = Field(default_factory=RaftConfig)
    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    consul: ConsulConfig = Field(default_factory=ConsulConfig)
    services: tuple[ServiceConfig, ...] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), _FileSource(settings_cls)

    @model_validator(mode="after")
    def _across_sections(self) -> Settings:
        problems = [*_service_problems(self.services), *_listen_problems(self)]
        if problems:
            raise ValueError("\n".join(f"{path}: {message}" for path, message in problems))
        return self

    def specs(self) -> list[ServiceSpec]:
        """The services' domain specs, in file order (see state.initial_state)."""
        return [service.spec for service in self.services]

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)

    def host_port(self, field: str) -> tuple[str, int]:
        """(host, port) of a HOST:PORT field by its path: "xds.listen", "api.listen",
        "raft.bind", "raft.peers[1]". KeyError for a path that names no such field."""
        value: Any = self
        for part in field.split("."):
            match = _PATH_PART.fullmatch(part)
            if match is None or not isinstance(value, BaseModel) or part == "":
                raise KeyError(field)
            name, indexes = match.groups()
            if name not in type(value).model_fields:
                raise KeyError(field)
            value = getattr(value, name)
            for index in re.findall(r"\[(\d+)\]", indexes):
                try:
                    value = value[int(index)]
                except (IndexError, TypeError):
                    raise KeyError(field) from None
        if not isinstance(value, str):
            raise KeyError(field)
        return parse_host_port(value)

    def raft_peers(self) -> list[tuple[str, int]]:
        return [parse_host_port(peer) for peer in self.raft.peers]

    def raft_password(self) -> str | None:
        return self.raft.password.get_secret_value() if self.raft.password else None


def _service_problems(services: Sequence[ServiceConfig]) -> ErrorList:
    problems: ErrorList = []
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    for i, service in enumerate(services):
        spec = service.spec
        if spec.name in names:
            problems.append(
                (
                    f"services[{i}].name",
                    f"duplicate service name {spec.name!r} (also services[{names[spec.name]}])",
                )
            )
        names.setdefault(spec.name, i)
        for field in ("listen_port", "read_port"):
            port = getattr(spec, field)
            if port is None:
                continue
            if port in ports:
                problems.append((f"services[{i}].{field}", f"port {port} is also {ports[port]}"))
            else:
                ports[port] = f"services[{i}].{field} ({spec.name})"
    return problems


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    def norm(host: str) -> str:
        return "127.0.0.1" if host in ("localhost", "::1") else host

    if a[1] != b[1]:
        return False
    ha, hb = norm(a[0]), norm(b[0])
    return ha == hb or ha in _WILDCARDS or hb in _WILDCARDS


def _listen_problems(settings: Settings) -> ErrorList:
    problems: ErrorList = []
    fields = ("xds.listen", "api.listen", "raft.bind")
    sockets = {field: settings.host_port(field) for field in fields}
    for j, later in enumerate(fields):
        for earlier in fields[:j]:
            if _same_socket(sockets[earlier], sockets[later]):
                port = sockets[later][1]
                problems.append((later, f"port {port} is also {earlier}; each needs its own port"))
                break
    return problems


# --- loading ----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"file not found: {source}")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"cannot read {source}: {exc}")], source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([("", _yaml_message(exc))], source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"expected a mapping of sections at the top, got {type(data).__name__}")], source
        )
    return data


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "malformed YAML"
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
        return str(what)
    return f"malformed YAML: {exc}"


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file at `path` (None: no file) and `REPSTAGE_*` variables from `env`
    (None: os.environ). Raises ConfigError listing every problem with its field path."""
    source = str(path) if path is not None else None
    data = _read_yaml(Path(path)) if path is not None else {}
    token = _INPUTS.set(_Inputs(file_data=data, env=env))
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_validation_errors(exc, env), source) from None
    except SettingsError as exc:
        raise ConfigError([_settings_error(exc)], source) from None
    finally:
        _INPUTS.reset(token)


_PREFIXED = re.compile(
    r"^([a-z_][a-z0-9_]*(?:\[\d+\])*(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])*)*): (.+)$", re.DOTALL
)


def _loc_path(loc: Sequence[int | str]) -> str:
    path = ""
    for i, part in enumerate(loc):
        if part == "spec" and i == 2 and loc[0] == "services" and isinstance(loc[1], int):
            continue  # ServiceConfig's wrapper: spec fields sit flat in the file
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _join(path: str, sub: str) -> str:
    return f"{path}.{sub}" if path else sub


def _validation_errors(exc: ValidationError, env: Mapping[str, str] | None) -> ErrorList:
    import os

    environ = env if env is not None else os.environ
    env_names = {name.upper() for name in environ}
    errors: ErrorList = []
    raw = exc.errors(include_url=False)
    failed = [_loc_path(e["loc"]) for e in raw]
    for error in raw:
        path = _loc_path(error["loc"])
        if error["type"] == "too_short" and any(other.startswith(path + "[") for other in failed):
            continue  # a list that lost a bad item: the item's own error says what is wrong
        ctx = error.get("ctx") or {}
        if error["type"] == "value_error" and "error" in ctx:
            # Our own validators: one problem per line, each may start with "sub.path: ".
            for line in str(ctx["error"]).splitlines():
                match = _PREFIXED.match(line)
                if match:
                    errors.append((_join(path, match.group(1)), match.group(2)))
                else:
                    errors.append((path, line))
        else:
            errors.append((path, error["msg"]))
    return [(path, _with_env_hint(path, message, env_names)) for path, message in errors]


def _with_env_hint(path: str, message: str, env_names: set[str]) -> str:
    """Say so when the bad value came from an environment variable."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = parts[:n]
        if any("[" in p for p in prefix):
            continue
        name = ENV_PREFIX + ENV_DELIMITER.join(p.upper() for p in prefix)
        if name in env_names:
            return f"{message} (from environment variable {name})"
    return message


def _settings_error(exc: SettingsError) -> tuple[str, str]:
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else ""
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    name = f"{ENV_PREFIX}{field.upper()}*" if field else f"{ENV_PREFIX}*"
    return (
        field,
        f"cannot parse the {name} environment variables (lists and mappings must be JSON){cause}",
    )
