"""OpenTelemetry traces of failovers: the SDK set-up and the `Tracing` facade.

One trace per failover or switchover, across every node. The leader's failover engine opens the
trace (`FailoverTrace`, in failover_trace); every node (followers too) adds a "push" span for its
own proxies (`PushTracer`, in push_tracer), because the trace context travels inside the
replicated command (`SetPrimary.trace`, W3C traceparent):

    failover  (root: service, old/new primary, epoch, cause, mode)         leader
    ├── detection / decision / raft.commit / promotion                     leader
    ├── push  (cp-1: one "ack" event per proxy: node id, version, latency)  every node
    └── push  (cp-2 ...)

Configuration: `telemetry.otlp_endpoint` in the config file (or REPSTAGE_TELEMETRY__OTLP_ENDPOINT),
else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`. No endpoint,
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`: tracing is off, the SDK is not even
imported, and every call below returns at once. Export is OTLP over gRPC with a
BatchSpanProcessor (tuned by `OTEL_BSP_*`); TLS, headers, timeout and compression follow the
exporter's own `OTEL_EXPORTER_OTLP_*` variables (an `http://` endpoint is plaintext, `https://`
TLS; a bare HOST:PORT is plaintext unless `OTEL_EXPORTER_OTLP_[TRACES_]INSECURE` says otherwise). The
service name is `telemetry.service_name` when set in the config, else `OTEL_SERVICE_NAME`, else
"repstage-mesh"; `OTEL_RESOURCE_ATTRIBUTES` are added; `service.instance.id` is the node id.
Each `Tracing` has its own TracerProvider (nothing global), so several nodes can share a process.

    tracing = Tracing.setup(settings.telemetry, node_id)
    push_tracer = tracing.push_tracer()                 # see push_tracer
    push_tracer.attach(tracker)                         # a TrackerObserver
    ft = tracing.start_failover("db", old="a", new="b", cause="primary_down", mode="follow")
    # ... the leader then records the phases on `ft`: see failover_trace
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.trace import Tracer

from repstage_mesh.config import TelemetryConfig
from repstage_mesh.core.addresses import parse_host_port
from repstage_mesh.core.errors import ConfigError
from repstage_mesh.telemetry._otel import _PROPAGATOR, _attrs, _ns
from repstage_mesh.telemetry.failover_trace import FailoverTrace
from repstage_mesh.telemetry.push_tracer import PushTracer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

__all__ = ["Tracing", "resolve_endpoint"]

_SCOPE = "repstage_mesh.failover"  # the tracer (instrumentation scope) name traces carry
MAX_PUSH_EVENTS = 10_000  # span event limit (one "ack" event per proxy)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def resolve_endpoint(telemetry: TelemetryConfig | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP gRPC endpoint to export to, or None when tracing is off.

    Raises ConfigError naming the field (or variable) when the endpoint is not HOST:PORT or an
    http(s):// URL."""
    env = os.environ if environ is None else environ
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters == {"none"}:
        return None
    candidates = [
        ("telemetry.otlp_endpoint", telemetry.otlp_endpoint if telemetry is not None else None),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", env.get("OTEL_EXPORTER_OTLP_ENDPOINT")),
    ]
    for where, value in candidates:
        if value is None or not value.strip():
            continue
        value = value.strip()
        if exporters - {"otlp"}:
            log.warning("OTEL_TRACES_EXPORTER=%s: only otlp (gRPC) is supported; using otlp", ",".join(sorted(exporters)))
        _check_endpoint(where, value)
        return value
    return None


def _check_endpoint(where: str, value: str) -> None:
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname:
            try:
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                pass
            else:
                return
        raise ConfigError([(where, f"expected HOST:PORT or an http(s):// URL, got {value!r}")])
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise ConfigError([(where, f"{exc} (or an http(s):// URL)")]) from None


def _plaintext(endpoint: str | None, environ: Mapping[str, str] | None = None) -> bool | None:
    """True for a bare HOST:PORT (what an OTel collector listens for by default), unless
    `OTEL_EXPORTER_OTLP_TRACES_INSECURE` / `OTEL_EXPORTER_OTLP_INSECURE` decide; None (the
    exporter decides: http:// plaintext, https:// TLS) for a URL. Without this the exporter
    would open TLS to a bare HOST:PORT and drop every span against a plaintext collector."""
    env = os.environ if environ is None else environ
    if endpoint is None or "://" in endpoint:
        return None
    if env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") is not None or env.get("OTEL_EXPORTER_OTLP_INSECURE") is not None:
        return None
    return True


# --- setup ------------------------------------------------------------------------------------


class Tracing:
    """This node's tracing: a TracerProvider of its own exporting over OTLP gRPC, or nothing."""

    def __init__(self, node_id: str, provider: TracerProvider | None = None) -> None:
        self.node_id = node_id
        self.provider = provider
        self.tracer: Tracer | None = provider.get_tracer(_SCOPE) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def disabled(cls, node_id: str = "") -> Tracing:
        return cls(node_id)

    @classmethod
    def setup(
        cls,
        telemetry: TelemetryConfig | None,
        node_id: str,
        *,
        exporter: SpanExporter | None = None,
    ) -> Tracing:
        """Tracing as the config and the `OTEL_*` environment say; off when no endpoint is set
        (and no `exporter` is given: tests may pass one, e.g. an InMemorySpanExporter).
        Raises ConfigError naming the field for a malformed endpoint."""
        endpoint = resolve_endpoint(telemetry)
        if endpoint is None and exporter is None:
            return cls(node_id)
        from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        telemetry = telemetry if telemetry is not None else TelemetryConfig()
        attributes: dict[str, str] = {SERVICE_INSTANCE_ID: node_id}
        if "service_name" in telemetry.model_fields_set or not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = telemetry.service_name
        # One event per proxy on a push span: the SDK's default of 128 events would drop most
        # of them on a node with many proxies. OTEL_SPAN_EVENT_COUNT_LIMIT still decides when set.
        limits = SpanLimits(
            max_events=None if os.environ.get("OTEL_SPAN_EVENT_COUNT_LIMIT") else MAX_PUSH_EVENTS
        )
        provider = TracerProvider(resource=Resource.create(attributes), span_limits=limits)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=_plaintext(endpoint))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing: exporting failover traces over OTLP gRPC to %s", endpoint or type(exporter).__name__)
        return cls(node_id, provider)

    def start_failover(
        self,
        service: str,
        old: str | None,
        new: str | None,
        *,
        cause: str,
        mode: str,
        epoch: int | None = None,
        started_at: float | None = None,
        parent: Mapping[str, str] | None = None,
        **attrs: Any,
    ) -> FailoverTrace:
        """Open the root span of a failover (or switchover). `started_at` (time.time()) lets
        the trace begin at the first sign of trouble (the first failed probe). `parent`, a W3C
        trace context ({"traceparent": ...}) from the caller of an announce, makes the change
        a child of the caller's trace; without one (or an invalid one) it is a new trace."""
        start = time.time() if started_at is None else started_at
        if self.tracer is None:
            return FailoverTrace(None, None, start)
        context = trace.set_span_in_context(trace.INVALID_SPAN)  # a new trace
        if parent:
            extracted = _PROPAGATOR.extract(carrier=dict(parent))
            if trace.get_current_span(extracted).get_span_context().is_valid:
                context = extracted
        span = self.tracer.start_span(
            "failover",
            context=context,
            attributes=_attrs({
                "service": service, "old_primary": old or "", "new_primary": new or "",
                "epoch": epoch, "cause": cause, "mode": mode, "control_plane": self.node_id, **attrs,
            }),
            start_time=_ns(start),
        )
        return FailoverTrace(self.tracer, span, start)

    def push_tracer(self, clock: Callable[[], float] = time.monotonic) -> PushTracer:
        return PushTracer(self.tracer, self.node_id, clock)

    def flush(self, timeout: float = 5.0) -> bool:
        """Export everything ended so far; True when done within `timeout`."""
        if self.provider is None:
            return True
        return self.provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: run it in an executor from async code)."""
        if self.provider is not None:
            self.provider.shutdown()
