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
    ENVOY_COLLECTOR_CLUSTER,
    ApiConfig,
    ApiTls,
    ApiTokens,
    ConsulConfig,
    EnvoyConfig,
    FailoversConfig,
    NamedToken,
    NodeConfig,
    RaftConfig,
    ServiceConfig,
    TelemetryConfig,
    default_node_id,
)
from repstage_mesh.config.settings import Settings
from repstage_mesh.config.startup import startup_problems
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
    "EnvoyConfig",
    "FailoversConfig",
    "HookSpec",
    "NamedToken",
    "NodeConfig",
    "RaftConfig",
    "SecretSource",
    "Secrets",
    "ServiceConfig",
    "Settings",
    "TelemetryConfig",
    "XdsConfig",
    "default_node_id",
    "format_errors",
    "hook_environment",
    "load_config",
    "parse_host_port",
    "startup_problems",
]
