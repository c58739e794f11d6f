"""Optional OpenTelemetry spans (only when enabled and `opentelemetry` is importable)."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("pdsidecar.tracing")
_tracer = None


def setup_tracing(enabled: bool, service_name: str) -> bool:
    """Enable spans; with OTEL_EXPORTER_OTLP_ENDPOINT set and no provider yet, export via OTLP."""
    global _tracer
    if not enabled:
        _tracer = None
        return False
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("--otel requested but opentelemetry is not installed; no spans")
        return False
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
        except Exception as e:  # exporter packages missing or misconfigured
            log.warning("OpenTelemetry exporter not set up", extra={"error": type(e).__name__})
    _tracer = trace.get_tracer("pdsidecar")
    return True


def span(name: str, **attrs):
    """A context manager: a real span when tracing is on, else a no-op."""
    if _tracer is None:
        return contextlib.nullcontext()
    return _tracer.start_as_current_span(name, attributes={k: v for k, v in attrs.items() if v is not None})
