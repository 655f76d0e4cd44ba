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

from repstage_mesh.config.checks import (
    Deployment,
    Problem,
    SpecParts,
    replicated_problems,
    service_problems,
)
from repstage_mesh.config.envoy_sections import ENVOY_COLLECTOR_CLUSTER, EnvoyConfig
from repstage_mesh.config.loading import load_config
from repstage_mesh.config.operator import (
    HOOK_ENV_ALLOW_LIST,
    HookSpec,
    Secrets,
    SecretSource,
    hook_environment,
)
from repstage_mesh.config.sections import (
    ENV_PREFIX,
    ApiConfig,
    ApiTls,
    ApiTokens,
    ConsulConfig,
    FailoversConfig,
    LogConfig,
    NamedToken,
    NodeConfig,
    RaftConfig,
    ServiceConfig,
    SnapshotSettings,
    TelemetryConfig,
    default_node_id,
)
from repstage_mesh.config.settings import Settings
from repstage_mesh.config.startup import (
    bind_problems,
    bind_refused_reason,
    listening,
    startup_problems,
)
from repstage_mesh.config.xds_sections import XdsConfig
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError, format_errors

__all__ = [
    "ENVOY_COLLECTOR_CLUSTER",
    "ENV_PREFIX",
    "HOOK_ENV_ALLOW_LIST",
    "ApiConfig",
    "ApiTls",
    "ApiTokens",
    "ConfigError",
    "ConsulConfig",
    "Deployment",
    "EnvoyConfig",
    "FailoversConfig",
    "HookSpec",
    "LogConfig",
    "NamedToken",
    "NodeConfig",
    "Problem",
    "RaftConfig",
    "SecretSource",
    "Secrets",
    "ServiceConfig",
    "Settings",
    "SnapshotSettings",
    "SpecParts",
    "TelemetryConfig",
    "XdsConfig",
    "bind_problems",
    "bind_refused_reason",
    "default_node_id",
    "format_errors",
    "hook_environment",
    "listening",
    "load_config",
    "parse_host_port",
    "replicated_problems",
    "service_problems",
    "startup_problems",
]
