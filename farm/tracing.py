"""OpenTelemetry tracing of a render across farm's processes.

A render's trace starts at the gateway (under the caller's W3C `traceparent` when it
sends one), travels with the render through the store (its `trace_parent` column) to
the scheduler, into the engine replica with the request, and on to the
post-processing replicas with each chunk. Each process exports its own spans over
OTLP/gRPC to `tracing.otlp_endpoint`.

Off by default, and then free: nothing here imports the OpenTelemetry SDK, every span
is the API's non-recording `INVALID_SPAN`, and no trace context is stored or sent."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)
TRACER_NAME = "farm"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_lock = threading.Lock()
_tracer: Any = None  # set once by `configure`; None: tracing is off in this process
_provider: Any = None


def configure(otlp_endpoint: str | None, service_name: str, *, sample_ratio: float = 1.0,
              flush_interval_s: float = 2.0, headers: Mapping[str, str] | None = None,
              resource: Mapping[str, str] | None = None) -> bool:
    """Turns tracing on in this process when `otlp_endpoint` is set (once: a second call
    keeps the first set-up). Spans are batched and exported every `flush_interval_s`;
    a trace is kept with probability `sample_ratio`, unless its caller's `traceparent`
    already decided. Returns whether tracing is on."""
    global _tracer, _provider
    if not otlp_endpoint:
        return _tracer is not None
    with _lock:
        if _tracer is not None:
            return True
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        attributes = {"service.name": service_name, **(resource or {})}
        # http:// means plaintext to the collector; https:// (or no scheme) TLS.
        insecure = otlp_endpoint.startswith("http://")
        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure, headers=dict(headers or {}))
        provider = TracerProvider(resource=Resource.create(attributes),
                                  sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=flush_interval_s * 1000))
        # A provider of farm's own rather than the global one: Ray and libraries in the
        # same process keep whatever they set up.
        _provider, _tracer = provider, provider.get_tracer(TRACER_NAME)
        log.info("tracing on: %s exports spans to %s", service_name, otlp_endpoint)
        return True


def enabled() -> bool:
    return _tracer is not None


def flush(timeout_s: float = 5.0) -> None:
    """Exports the spans still batched (before a process exits on purpose)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def _context(trace_parent: str | None, trace_state: str | None = None):
    if not trace_parent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {TRACEPARENT: trace_parent}
    if trace_state:
        carrier[TRACESTATE] = trace_state
    return TraceContextTextMapPropagator().extract(carrier)


def start_span(name: str, parent: str | None = None, *, attributes: Mapping[str, Any] | None = None,
               start_time: dt.datetime | float | None = None, kind: str = "internal",
               parent_state: str | None = None):
    """A span under the W3C `parent` (None: a new trace), started now or at `start_time`
    (a datetime, or seconds since the epoch). The caller ends it (`span.end()`). With
    tracing off: the non-recording INVALID_SPAN, at no cost."""
    from opentelemetry import trace

    if _tracer is None:
        return trace.INVALID_SPAN
    if isinstance(start_time, dt.datetime):
        start_time = start_time.replace(tzinfo=start_time.tzinfo or dt.UTC).timestamp()
    return _tracer.start_span(
        name, context=_context(parent, parent_state), kind=getattr(trace.SpanKind, kind.upper()),
        attributes={k: v for k, v in (attributes or {}).items() if v is not None},
        start_time=int(start_time * 1e9) if start_time is not None else None,
    )


@contextmanager
def span(name: str, parent: str | None = None, **options) -> Iterator[Any]:
    """`start_span` as a context manager: ended on exit, an escaping exception recorded
    as the span's error. Not made current: farm hands parents on explicitly (see
    `traceparent_of`), so generators and threads never lose or leak a context."""
    current = start_span(name, parent, **options)
    try:
        yield current
    except BaseException as error:
        if current.is_recording():
            from opentelemetry.trace import Status, StatusCode

            current.record_exception(error)
            current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        raise
    finally:
        current.end()


def traceparent_of(current) -> str | None:
    """The W3C traceparent naming `current` as a parent, for the next process; None when
    tracing is off. A span its trace's sampler dropped is named too, flagged unsampled,
    so that the processes after it drop their spans of the trace as well."""
    if _tracer is None:
        return None
    context = current.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def caller_trace(metadata) -> tuple[str | None, str | None]:
    """(traceparent, tracestate) a gRPC caller sent in its metadata, if any."""
    if _tracer is None or not metadata:
        return None, None
    found = {key: value for key, value in metadata if key in (TRACEPARENT, TRACESTATE)}
    return found.get(TRACEPARENT), found.get(TRACESTATE)


class Phases:
    """One span per phase, in turn, under `parent`: `enter(phase)` ends the running
    phase's span and starts the next one's; `close()` ends the last (with `error`, when
    the work ended with one). Meant for one thread."""

    def __init__(self, parent: str | None, prefix: str, attributes: Mapping[str, Any] | None = None):
        self.parent, self.prefix, self.attributes = parent, prefix, dict(attributes or {})
        from opentelemetry import trace

        self.current = trace.INVALID_SPAN
        self.phase: str | None = None

    def enter(self, phase: str) -> None:
        if _tracer is None or phase == self.phase:
            return
        self.current.end()
        self.phase = phase
        self.current = start_span(f"{self.prefix} {phase.lower()}", self.parent, attributes=self.attributes)

    def close(self, error: BaseException | None = None) -> None:
        if error is not None and self.current.is_recording():
            from opentelemetry.trace import Status, StatusCode

            self.current.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.current.end()
        from opentelemetry import trace

        self.current, self.phase = trace.INVALID_SPAN, None


def shutdown() -> None:
    """Exports what is batched and turns tracing off in this process."""
    global _tracer, _provider
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _tracer = _provider = None


@contextmanager
def current(active) -> Iterator[None]:
    """Makes `active` the current span of this task or thread for the block, so calls made
    within it (`current_traceparent`) carry it on; for blocks that yield nothing."""
    if _tracer is None or not active.get_span_context().is_valid:
        yield
        return
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(active))
    try:
        yield
    finally:
        context.detach(token)


def current_traceparent() -> str | None:
    """The traceparent of the current span (see `current`), for a call to another process."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    return traceparent_of(trace.get_current_span())
