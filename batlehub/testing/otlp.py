"""A real OTLP/gRPC trace receiver for tests: what a collector would receive from a hub.

    with OtlpReceiver() as receiver:          # listens on a free loopback port
        config = f'[otel]\\nendpoint = "{receiver.endpoint}"\\n'
        ...
        spans = receiver.wait_for(lambda spans: any(s.name == "GET package" for s in spans))

It speaks the collector's own protocol (the `TraceService` of `opentelemetry-proto`, served by
grpcio), so the hub's exporter is exercised exactly as in production. Start hubs under test with
`OTEL_BSP_SCHEDULE_DELAY` set low (e.g. 100 ms) so batches leave quickly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from batlehub.testing.services import LOOPBACK


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, flattened for assertions."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """A gRPC server implementing OTLP's trace export; keeps every span it receives."""

    def __init__(self) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        receiver = self
        self.spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # the protocol names it
                receiver._keep(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _keep(self, request: Any) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            resource=resource,
                        )
                    )
        with self._lock:
            self.spans.extend(found)

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_secs: float = 15.0) -> list[ReceivedSpan]:
        """Every span received once `done(spans)` holds; AssertionError if it never does."""
        deadline = time.monotonic() + timeout_secs
        while True:
            spans = self.received()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({s.name for s in spans})
                raise AssertionError(f"not received within {timeout_secs:g}s; {len(spans)} spans: {names}")
            time.sleep(0.05)

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
