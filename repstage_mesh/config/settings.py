"""`Settings`: every section together, the sources they are read from (the YAML file,
`REPSTAGE_*` variables) and the checks that span sections."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from repstage_mesh.config.sections import (
    _WILDCARDS,
    ENV_DELIMITER,
    ENV_PREFIX,
    ApiConfig,
    ConsulConfig,
    EnvoyConfig,
    ErrorList,
    FailoversConfig,
    NodeConfig,
    RaftConfig,
    ServiceConfig,
    SnapshotSettings,
    TelemetryConfig,
    XdsConfig,
)
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.models import ServiceSpec

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
    failovers: FailoversConfig = Field(default_factory=FailoversConfig)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
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
        problems = [*_service_problems(self.services), *_listen_problems(self), *_snapshot_problems(self)]
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


def _snapshot_problems(settings: Settings) -> ErrorList:
    """`snapshots.pre_hook`/`post_hook` must name a hook of `hooks:` (where that section exists)."""
    hooks = getattr(settings, "hooks", None)
    if hooks is None:
        return []
    return [
        (f"snapshots.{field}", f"no hook named {name!r} in hooks: (known: {sorted(hooks)})")
        for field, name in (("pre_hook", settings.snapshots.pre_hook), ("post_hook", settings.snapshots.post_hook))
        if name is not None and name not in hooks
    ]


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


