"""Access logs shared by the TCP and HTTP listeners."""

from __future__ import annotations

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog

from .type_urls import pack


def stdout_access_log() -> AccessLog:
    """Envoy's default access log format, written to Envoy's stdout."""
    return AccessLog(name="envoy.access_loggers.stdout", typed_config=pack(StdoutAccessLog()))
