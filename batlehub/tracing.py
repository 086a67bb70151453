"""Tracing through opentelemetry-api: a span per request, child spans for the cache, the database,
storage and upstream requests, and W3C `traceparent` in both directions.

Spans are made only when `[otel] endpoint` is set (`active`): even a no-op span costs a few
microseconds, which is measurable on the packument path, so with no endpoint no OpenTelemetry
object is made at all and each place that could trace costs one check of a module flag. With the
endpoint set and the SDK installed (`pip install 'batlehub[otel]'`), spans are exported over OTLP
(gRPC) to that endpoint, with the service name, version and this process's replica id as resource
attributes.

Nothing secret goes into a span: paths as the access log shows them (a token in an npm logout URL
is redacted), upstream URLs without credentials or query, SQL text without its parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator, MutableMapping
from typing import Any

from opentelemetry import propagate, trace
from yarl import URL

from batlehub.config import OtelSettings

log = logging.getLogger("batlehub.server")

active = False
"""Whether spans are made (`[otel] endpoint` is set). Checked before anything else is done."""
tracer = trace.get_tracer("batlehub")
"""Delegates to the tracer provider `configure_tracing` installs (or the operator's own)."""
REPLICA_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
"""`service.instance.id`: which process made a span (several replicas and workers export)."""

_provider: Any = None


def configure_tracing(otel: OtelSettings) -> bool:
    """Set up export to `otel.endpoint` if the SDK is installed. Returns whether requests should
    be traced at all (and sets `active`)."""
    global active, _provider
    active = bool(otel.endpoint)
    if not active:
        return False
    try:
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
    from batlehub import __version__

    resource = Resource.create(
        {"service.name": otel.service_name, "service.version": __version__, "service.instance.id": REPLICA_ID}
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=otel.endpoint, insecure=not otel.endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("exporting traces to %s as %s (%s)", otel.endpoint, otel.service_name, REPLICA_ID)
    return True


def set_active(on: bool) -> None:
    """Trace (or not) without touching the exporter: for an app built with `[otel] endpoint`
    whose process set up tracing another way (tests, an embedding program)."""
    global active
    active = on


def shutdown() -> None:
    """Send the spans still buffered (at stop: a batch would otherwise be lost with the process)."""
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # the collector being down must not fail a clean stop
            log.warning("could not flush the last spans: %s", exc)


@contextlib.contextmanager
def span(name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one, or nothing when tracing is off. Callers on hot paths
    check `active` themselves first, so that when it is off not even this call is made."""
    if not active:
        yield None
        return
    with tracer.start_as_current_span(name, kind=kind, attributes=attributes) as current:
        yield current


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) of the current span to outgoing `headers`."""
    propagate.inject(headers)


def extract(headers: Any) -> Any:
    """The context a client sent in `traceparent`, for the request's span to continue."""
    return propagate.extract(headers)


def trace_id() -> str | None:
    """The current trace's id as 32 hex digits, or None outside a recorded span."""
    if not active:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def safe_url(url: URL) -> str:
    """`url` as a span may show it: no user, password or query string."""
    return str(url.with_user(None).with_query(None).with_fragment(None))
