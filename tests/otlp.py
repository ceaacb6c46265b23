"""An OTLP/gRPC trace receiver in the test process: what a collector would get from
farm's exporters, span by span."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    start_ns: int
    end_ns: int
    error: bool


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TraceReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=resource.get("service.name", ""), name=span.name, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                        error=span.status.code == span.status.STATUS_CODE_ERROR))
        with self._lock:
            self._spans += received
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[str] | dict[str, int], timeout_s: float = 60) -> list[ReceivedSpan]:
        """The trace's spans once every name in `names` (a span name's prefix) is among them
        (as many times as a dict says: each process exports its spans in its own time)."""
        wanted = names if isinstance(names, dict) else dict.fromkeys(names, 1)
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans(trace_id)
            missing = {n for n, count in wanted.items() if sum(s.name.startswith(n) for s in spans) < count}
            if not missing:
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"trace {trace_id}: no spans named {sorted(missing)}; got "
                                   f"{sorted((s.service, s.name) for s in spans)}")
            time.sleep(POLL_S)
