"""telemetry: Prometheus metrics and OpenTelemetry traces (SDK set-up, the failover trace,
the push tracer that follows a change to every proxy's ACK)."""

from repstage_mesh.telemetry.metrics import MeshMetrics, write_failure_code
from repstage_mesh.telemetry.tracing import (
    FailoverTrace,
    PushResult,
    PushTracer,
    Tracing,
    resolve_endpoint,
    version_index,
)

__all__ = [
    "FailoverTrace",
    "MeshMetrics",
    "PushResult",
    "PushTracer",
    "Tracing",
    "resolve_endpoint",
    "version_index",
    "write_failure_code",
]
