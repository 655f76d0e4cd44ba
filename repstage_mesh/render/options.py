"""How replicated state becomes Envoy config on this deployment: the render options.

Kept apart from the renderer so that loading a config file (which builds these options) does
not import the renderer, the filter builders or envoy-data-plane.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The same defaults as filters.http's retry_policy (tests/test_render.py holds them equal):
# retry what cannot have reached the application, not 5xx in general.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIABLE_STATUS_CODES: tuple[int, ...] = (503,)


class PrimaryStrategy(StrEnum):
    """How the primary cluster is rendered (see the module docstring)."""

    EDS_ONLY = "eds_only"
    EPOCH_CLUSTER = "epoch_cluster"
    HEALTH_FENCE = "health_fence"


class RenderOptions(BaseModel):
    """Node-local choices of how state becomes Envoy config (identical on every node)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bind_address: str = Field(default="0.0.0.0", description="address the service listeners bind")
    primary_strategy: PrimaryStrategy = PrimaryStrategy.EDS_ONLY
    connect_timeout: timedelta = Field(default=timedelta(seconds=1), gt=timedelta(0))
    tcp_idle_timeout: timedelta | None = Field(
        default=None, description="tcp_proxy idle timeout; None keeps Envoy's 1 h, 0 disables"
    )
    access_log: bool = False
    http_retry_on: str = DEFAULT_RETRY_ON
    http_num_retries: int = Field(default=3, ge=0, le=10)
    http_per_try_timeout: timedelta | None = None
    http_retriable_status_codes: tuple[int, ...] = DEFAULT_RETRIABLE_STATUS_CODES
    tracing_collector_cluster: str | None = Field(
        default=None,
        description="when set, HTTP listeners send OpenTelemetry spans to this cluster",
    )
    tracing_collector_address: tuple[str, int] | None = Field(
        default=None,
        description="(host, port) of the OTLP/gRPC collector (plaintext): when set with "
        "tracing_collector_cluster and at least one HTTP service, that cluster is rendered over "
        "CDS (STATIC for an IP, STRICT_DNS for a name); unset, the bootstrap must define it",
    )
    tracing_sampling_percent: float = Field(default=100.0, ge=0.0, le=100.0)
    fence_port: Annotated[int, Field(ge=1, le=65534)] | None = Field(
        default=None, description="port of the fence listener (required by health_fence)"
    )
    fence_address: str = Field(
        default="127.0.0.1", description="IP the fence listener binds and health checks connect to"
    )
    fence_interval: timedelta = Field(default=timedelta(milliseconds=250), gt=timedelta(0))
    fence_timeout: timedelta = Field(default=timedelta(milliseconds=200), gt=timedelta(0))
    fence_unhealthy_interval: timedelta | None = Field(
        default=None, description="how often a failed host (not the primary) is checked; None: fence_interval"
    )

    @field_validator("bind_address", "fence_address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.ip_address(value)  # raises ValueError naming the value
        return value

    @field_validator("tcp_idle_timeout", "http_per_try_timeout")
    @classmethod
    def _not_negative(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @model_validator(mode="after")
    def _fence(self) -> RenderOptions:
        if self.primary_strategy is PrimaryStrategy.HEALTH_FENCE and self.fence_port is None:
            raise ValueError("fence_port: required by the health_fence strategy")
        if self.fence_unhealthy_interval is not None and self.fence_unhealthy_interval < self.fence_interval:
            raise ValueError("fence_unhealthy_interval: must be at least fence_interval")
        return self


