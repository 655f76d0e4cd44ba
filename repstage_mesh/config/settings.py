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
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from repstage_mesh.config.checks import (
    Deployment,
    Problem,
    SpecParts,
    listener_problems,
    reserved_ports,
    service_problems,
)
from repstage_mesh.config.envoy_sections import EnvoyConfig
from repstage_mesh.config.operator import HookSpec, Secrets, SecretSource, hook_problems
from repstage_mesh.config.sections import (
    ENV_DELIMITER,
    ENV_PREFIX,
    ApiConfig,
    ConsulConfig,
    FailoversConfig,
    LogConfig,
    NodeConfig,
    RaftConfig,
    ServiceConfig,
    SnapshotSettings,
    TelemetryConfig,
    is_loopback,
    is_wildcard,
)
from repstage_mesh.config.xds_sections import XdsConfig
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.models import Name, ServiceSpec
from repstage_mesh.render.options import PrimaryStrategy

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
    log: LogConfig = Field(default_factory=LogConfig)
    snapshots: SnapshotSettings = Field(default_factory=SnapshotSettings)
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

    @model_validator(mode="wrap")
    @classmethod
    def _across_sections(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """The semantic pass (config/checks.py) over the whole file; when pydantic refused some
        parts, over the parts it accepted, so that every problem comes in one report."""
        try:
            settings = handler(data)
        except ValidationError as exc:
            failed = _failed_paths(exc)
            problems = [p for p in _Parts.salvage(data).problems() if not _covered(p, failed)]
            if not problems:
                raise
            raise _with_problems(exc, problems) from None
        problems = _Parts.of(settings).problems()
        if problems:
            raise ValueError("\n".join(f"{p.field}: {p.message}" for p in problems))
        return settings

    def deployment(self) -> Deployment:
        """What a service is checked against besides other services (PUT uses it too)."""
        return _Parts.of(self).deployment()

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



# --- the semantic pass over the file (config/checks.py) ---------------------------------------


def error_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the file's field path (`services[0].members[1].port`)."""
    path = ""
    for i, part in enumerate(loc):
        if part == "spec" and i == 2 and loc[0] == "services" and isinstance(loc[1], int):
            continue  # ServiceConfig's wrapper: spec fields sit flat in the file
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


_LINE_FIELD = re.compile(r"^(?:Value error, )?([a-z_][a-z0-9_]*(?:\[\d+\])*(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])*)*): ")


def _failed_paths(exc: ValidationError) -> set[str]:
    """The fields pydantic refused; a model validator's "<field>: message" lines name theirs."""
    failed: set[str] = set()
    for error in exc.errors(include_url=False):
        path = error_path(error["loc"])
        named = [m.group(1) for m in map(_LINE_FIELD.match, str(error["msg"]).splitlines()) if m]
        if error["type"] == "value_error" and named:
            failed.update(f"{path}.{sub}" if path else sub for sub in named)
        else:
            failed.add(path)
    return failed


def _advertise_problems(api: ApiConfig, xds: XdsConfig, raft: RaftConfig) -> list[Problem]:
    """What this node announces must reach it: never a wildcard; in a multi-node cluster, set
    explicitly for a wildcard bind, and not loopback when a peer is not."""
    problems: list[Problem] = []
    multi = raft.multi_node
    remote_peer = next((p for p in raft.peers if not is_loopback(parse_host_port(p)[0])), None)
    entries = (
        ("api", "listen", api.listen, api.advertise),
        ("xds", "listen", xds.listen, xds.advertise),
        ("raft", "bind", raft.bind, raft.advertise),
    )
    for section, bind_field, bind, advertise in entries:
        env = f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}ADVERTISE"
        if advertise is not None and is_wildcard(parse_host_port(advertise)[0]):
            problems.append(Problem(f"{section}.advertise", f"{advertise!r} is a wildcard address, which "
                             "nobody can reach; give this node's own address (e.g. the pod IP)"))
            continue
        if advertise is None and multi and is_wildcard(parse_host_port(bind)[0]):
            problems.append(Problem(f"{section}.advertise", f"required in a multi-node cluster when "
                             f"{section}.{bind_field} is a wildcard ({bind!r}): set the address the "
                             f"other nodes reach this node at, e.g. the pod IP (or {env})"))
            continue
        announced = advertise if advertise is not None else bind
        if remote_peer is not None and is_loopback(parse_host_port(announced)[0]):
            field = f"{section}.advertise" if advertise is not None else f"{section}.{bind_field}"
            problems.append(Problem(field, f"{announced!r} is a loopback address but peer {remote_peer!r} "
                             "is not: the other nodes could not reach this one; set "
                             f"{section}.advertise (or {env}) to an address they reach"))
    return problems


def _covered(problem: Problem, failed: set[str]) -> bool:
    """pydantic already reported this field, a part of it or what holds it."""
    return any(problem.field == f or problem.field.startswith((f + ".", f + "[")) or f.startswith(problem.field + ".")
               for f in failed)


def _section(data: Mapping[str, Any], name: str) -> Any:
    """One section of the raw input validated alone; None when pydantic refuses it."""
    info = Settings.model_fields[name]
    try:
        if name not in data:
            return info.get_default(call_default_factory=True)
        return TypeAdapter(info.rebuild_annotation()).validate_python(data[name])
    except (ValidationError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class _Parts:
    """The sections and services that validated (None: refused by pydantic, checks skipped)."""

    xds: XdsConfig | None
    api: ApiConfig | None
    raft: RaftConfig | None
    envoy: EnvoyConfig | None
    consul: ConsulConfig | None
    services: tuple[tuple[int, SpecParts], ...]
    hooks: Mapping[str, HookSpec] | None
    secrets: Mapping[str, SecretSource] | None
    snapshots: SnapshotSettings | None = None

    @classmethod
    def of(cls, s: Settings) -> _Parts:
        services = tuple((i, SpecParts.of(c.spec)) for i, c in enumerate(s.services))
        return cls(s.xds, s.api, s.raft, s.envoy, s.consul, services, s.hooks, s.secrets, s.snapshots)

    @classmethod
    def salvage(cls, data: Any) -> _Parts:
        data = data if isinstance(data, Mapping) else {}
        raw = data.get("services")
        items = list(raw) if isinstance(raw, (list, tuple)) else []
        services = tuple(
            (i, SpecParts.salvage(item.get("spec", item) if isinstance(item, Mapping) else item))
            for i, item in enumerate(items)
        )
        sections = {name: _section(data, name)
                    for name in ("xds", "api", "raft", "envoy", "consul", "hooks", "secrets", "snapshots")}
        return cls(services=services, **sections)

    def sockets(self, *, bound_only: bool = False) -> dict[str, tuple[str, int]]:
        """This node's sockets by field (bound_only: raft.bind only when it binds, multi-node)."""
        out: dict[str, tuple[str, int]] = {}
        if self.xds is not None:
            out["xds.listen"] = parse_host_port(self.xds.listen)
        if self.api is not None:
            out["api.listen"] = parse_host_port(self.api.listen)
        if self.raft is not None and (self.raft.multi_node or not bound_only):
            out["raft.bind"] = parse_host_port(self.raft.bind)
        return out

    def _envoy_ports(self) -> tuple[int | None, int | None, str | None]:
        envoy = self.envoy
        if envoy is None:
            return None, None, None
        fence = envoy.fence_port if envoy.primary_strategy is PrimaryStrategy.HEALTH_FENCE else None
        return fence, envoy.admin_port, envoy.listen_address

    def _xds_advertise(self) -> str | None:
        """The host the Envoys are told to reach xDS at, when it differs from xds.listen's."""
        if self.xds is None or self.xds.advertise is None:
            return None
        return parse_host_port(self.xds.advertise)[0]

    def deployment(self) -> Deployment:
        fence, admin, address = self._envoy_ports()
        secret_hosts = (
            {n: frozenset(s.hosts) if s.hosts is not None else None for n, s in self.secrets.items()}
            if self.secrets is not None else None
        )
        return Deployment(
            reserved_ports=reserved_ports(fence, admin, address, self.sockets(bound_only=True), self._xds_advertise()),
            hooks=frozenset(self.hooks) if self.hooks is not None else None,
            secret_hosts=secret_hosts,
            consul=bool(self.consul.address) if self.consul is not None else None,
        )

    def problems(self) -> list[Problem]:
        fence, admin, address = self._envoy_ports()
        problems = listener_problems(self.sockets(), fence, admin, address, self._xds_advertise())
        if self.api is not None and self.xds is not None and self.raft is not None:
            problems += _advertise_problems(self.api, self.xds, self.raft)
        deployment = self.deployment()
        names: dict[str, int] = {}
        taken: dict[int, str] = {}
        for i, parts in self.services:
            if parts.name is not None and parts.name in names:
                problems.append(Problem(f"services[{i}].name",
                                        f"duplicate service name {parts.name!r} (also services[{names[parts.name]}])"))
            if parts.name is not None:
                names.setdefault(parts.name, i)
            problems += service_problems(parts, deployment, taken, f"services[{i}].")
            for name in ("listen_port", "read_port"):
                port = getattr(parts, name)
                if port is not None:
                    taken.setdefault(port, f"services[{i}].{name} ({parts.name})")
        if self.hooks is not None and self.secrets is not None:
            problems += [Problem(f, m) for f, m in hook_problems(self.hooks, self.secrets)]
        if self.hooks is not None and self.snapshots is not None:  # snapshot hooks name hooks:
            problems += [
                Problem(f"snapshots.{field}", f"no hook named {name!r} in hooks: (known: {sorted(self.hooks)})")
                for field, name in (("pre_hook", self.snapshots.pre_hook), ("post_hook", self.snapshots.post_hook))
                if name is not None and name not in self.hooks
            ]
        return problems


def _with_problems(exc: ValidationError, problems: Sequence[Problem]) -> ValidationError:
    """pydantic's errors and the semantic pass's problems as one ValidationError (the latter
    as `semantic` errors whose message starts with the field path, like value errors)."""
    lines: list[Any] = []
    for error in exc.errors(include_url=False):
        line = {"type": error["type"], "loc": error["loc"], "input": error["input"]}
        if "ctx" in error:
            line["ctx"] = error["ctx"]
        lines.append(line)
    for problem in problems:
        custom = PydanticCustomError("semantic", "{field}: {message}",
                                     {"field": problem.field, "message": problem.message})
        lines.append({"type": custom, "loc": (), "input": None})
    try:
        return ValidationError.from_exception_data(exc.title, lines)
    except Exception:  # an error type pydantic cannot rebuild: its own errors, at least
        return exc
