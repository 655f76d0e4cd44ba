"""The config file's `envoy:` section: how replicated state is rendered for Envoy."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, model_validator

from repstage_mesh.config.sections import IPAddress, Section
from repstage_mesh.render.options import PrimaryStrategy, RenderOptions

if TYPE_CHECKING:
    from repstage_mesh.config.sections import TelemetryConfig


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
    admin_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=9901,
        description="the Envoys' admin port (bootstrap --admin-port); only checked: no service may use it (null: not checked)",
    )
    fence_interval_ms: int = Field(
        default=100, ge=10, le=10_000,
        description="health_fence: how often Envoy re-checks who the primary is; bounds how long an open connection to a demoted primary survives",
    )
    fence_unhealthy_interval_ms: int | None = Field(
        default=None, ge=10, le=60_000,
        description="health_fence: how often Envoy re-checks a member that is not the primary (a replica, a demoted primary: its promotion makes it a new host, checked at once); at least fence_interval_ms; default 5 x fence_interval_ms",
    )

    @property
    def unhealthy_interval_ms(self) -> int:
        """`fence_unhealthy_interval_ms`, or 5 x `fence_interval_ms` when it is not set."""
        if self.fence_unhealthy_interval_ms is None:
            return UNHEALTHY_FACTOR * self.fence_interval_ms
        return self.fence_unhealthy_interval_ms

    @model_validator(mode="after")
    def _fence_intervals(self) -> EnvoyConfig:
        if self.fence_unhealthy_interval_ms is not None and self.fence_unhealthy_interval_ms < self.fence_interval_ms:
            raise ValueError(
                f"fence_unhealthy_interval_ms: must be at least fence_interval_ms ({self.fence_interval_ms}), "
                f"got {self.fence_unhealthy_interval_ms}"
            )
        return self

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
            fence_unhealthy_interval=timedelta(milliseconds=self.unhealthy_interval_ms),
            tracing_collector_cluster=ENVOY_COLLECTOR_CLUSTER if collector is not None else None,
            tracing_collector_address=collector,
            tracing_sampling_percent=telemetry.envoy_sampling_percent if telemetry is not None else 100.0,
        )


ENVOY_COLLECTOR_CLUSTER = "repstage-otel-collector"
UNHEALTHY_FACTOR = 5  # fence_unhealthy_interval_ms when not set: this many fence intervals
