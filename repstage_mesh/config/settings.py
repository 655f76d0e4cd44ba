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

from repstage_mesh.config.operator import HookSpec, Secrets, SecretSource, hook_problems
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
    TelemetryConfig,
    is_loopback,
    is_wildcard,
)
from repstage_mesh.config.xds_sections import XdsConfig
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.models import Name, ServiceSpec

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
    services: tuple[ServiceConfig, ...] = ()
    hooks: dict[Name, HookSpec] = Field(
        default_factory=dict, description="promotion hooks by name (services name them)"
    )
    secrets: dict[Name, SecretSource] = Field(
        default_factory=dict, description="secrets by name: {env: VAR} or {file: PATH}"
    )

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
        problems = [
            *_service_problems(self.services),
            *_listen_problems(self),
            *_advertise_problems(self),
            *hook_problems(self.hooks, self.secrets),
            *_reference_problems(self),
        ]
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

    def secret_store(self, environ: Mapping[str, str] | None = None) -> Secrets:
        """The `secrets:` section as a lookup by name (os.environ unless `environ` is given)."""
        return Secrets(self.secrets, environ)

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


def _reference_problems(settings: Settings) -> ErrorList:
    """Every hook and secret a service names is defined in this file."""
    problems: ErrorList = []
    for i, service in enumerate(settings.services):
        lead = service.spec.leadership
        if lead.promote_hook is not None and lead.promote_hook not in settings.hooks:
            problems.append((f"services[{i}].leadership.promote_hook",
                             f"no hook named {lead.promote_hook!r} in hooks: (known: {sorted(settings.hooks)})"))
        secret = lead.probe.password_secret
        field = f"services[{i}].leadership.probe.password_secret"
        if secret is not None and secret not in settings.secrets:
            problems.append((field, f"no secret named {secret!r} in secrets: (known: {sorted(settings.secrets)})"))
        elif secret is not None:
            refused = [m.address for m in service.spec.members if not settings.secrets[secret].allows(m.address)]
            if refused:
                problems.append((field, f"secret {secret!r} may not be sent to {refused} (secrets.{secret}.hosts)"))
    return problems


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    def norm(host: str) -> str:
        return "127.0.0.1" if host in ("localhost", "::1") else host

    if a[1] != b[1]:
        return False
    ha, hb = norm(a[0]), norm(b[0])
    return ha == hb or ha in _WILDCARDS or hb in _WILDCARDS


def _advertise_problems(settings: Settings) -> ErrorList:
    """What this node announces must reach it: never a wildcard; in a multi-node cluster, set
    explicitly for a wildcard bind, and not loopback when a peer is not."""
    problems: ErrorList = []
    multi = settings.raft.multi_node
    remote_peer = next((p for p in settings.raft.peers if not is_loopback(parse_host_port(p)[0])), None)
    entries = (
        ("api", "listen", settings.api.listen, settings.api.advertise),
        ("xds", "listen", settings.xds.listen, settings.xds.advertise),
        ("raft", "bind", settings.raft.bind, settings.raft.advertise),
    )
    for section, bind_field, bind, advertise in entries:
        env = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}ADVERTISE"
        if advertise is not None and is_wildcard(parse_host_port(advertise)[0]):
            problems.append((f"{section}.advertise", f"{advertise!r} is a wildcard address, which "
                             "nobody can reach; give this node's own address (e.g. the pod IP)"))
            continue
        if advertise is None and multi and is_wildcard(parse_host_port(bind)[0]):
            problems.append((f"{section}.advertise", f"required in a multi-node cluster when "
                             f"{section}.{bind_field} is a wildcard ({bind!r}): set the address the "
                             f"other nodes reach this node at, e.g. the pod IP (or {env})"))
            continue
        announced = advertise if advertise is not None else bind
        if remote_peer is not None and is_loopback(parse_host_port(announced)[0]):
            field = f"{section}.advertise" if advertise is not None else f"{section}.{bind_field}"
            problems.append((field, f"{announced!r} is a loopback address but peer {remote_peer!r} "
                             "is not: the other nodes could not reach this one; set "
                             f"{section}.advertise (or {env}) to an address they reach"))
    return problems


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


