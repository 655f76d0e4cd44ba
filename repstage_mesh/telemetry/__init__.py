"""telemetry: Prometheus metrics and OpenTelemetry traces (SDK set-up, the failover trace,
the push tracer that follows a change to every proxy's ACK)."""

from repstage_mesh.telemetry.failover_trace import FailoverTrace
from repstage_mesh.telemetry.metrics import MeshMetrics, write_failure_code
from repstage_mesh.telemetry.push_tracer import PushResult, PushTracer, version_index
from repstage_mesh.telemetry.tracing import Tracing, resolve_endpoint

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
