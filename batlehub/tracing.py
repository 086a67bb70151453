"""Tracing through opentelemetry-api.

Spans are made only when `[otel] endpoint` is set: a no-op span still costs a few microseconds
per request, which is measurable on the packument path. With the endpoint set and the SDK
installed (`pip install 'batlehub[otel]'`), spans are exported over OTLP to that endpoint.
"""

from __future__ import annotations

import logging

from batlehub.config import OtelSettings

log = logging.getLogger("batlehub.server")


def configure_tracing(otel: OtelSettings) -> bool:
    """Set up export to `otel.endpoint` if the SDK is installed. Returns whether requests should
    be traced at all."""
    if not otel.endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "otel.endpoint is set but the OpenTelemetry SDK is not installed; spans go to any tracer"
            " provider the process has, or nowhere (pip install 'batlehub[otel]')"
        )
        return True
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return True  # the operator configured the SDK already (e.g. opentelemetry-instrument)
    provider = TracerProvider(resource=Resource.create({"service.name": otel.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otel.endpoint, insecure=True)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s as %s", otel.endpoint, otel.service_name)
    return True
