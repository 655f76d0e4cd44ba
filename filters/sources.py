"""Config sources: where Envoy fetches dynamic resources from (always ADS here)."""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
)


def ads_config_source() -> ConfigSource:
    """`{ads: {}, resource_api_version: V3}`: fetch over the aggregated (ADS) stream."""
    return ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
