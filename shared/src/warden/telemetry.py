"""OpenTelemetry set-up and W3C trace context carried in NATS message headers."""

import functools
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from warden.wire import new_traceparent

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


class _Mode:
    """Whether spans are recorded. Without an exporter they are not, and a message's trace context
    is passed on as it came (set by configure_tracing; tests that record spans leave it off)."""

    passthrough = False


def configure_tracing(service: str) -> TracerProvider:
    """Install a tracer provider for this process; export over OTLP when an endpoint is configured."""
    exporting = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    # With nowhere to send spans, record none: the trace context still flows through every
    # message (so events and audit rows keep their trace id) at a fraction of the cost.
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}), sampler=None if exporting else ALWAYS_OFF
    )
    _Mode.passthrough = not exporting
    if exporting:
        # Imported lazily: the exporter pulls in gRPC, which nobody without a collector needs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def spans_recorded() -> bool:
    """Whether this process records spans (False without an exporter: see configure_tracing)."""
    return not _Mode.passthrough


def inject_trace_context(headers: dict[str, str], *, start_trace: bool = False) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) for the current span to outgoing message headers.

    With `start_trace`, a message sent outside any span (a client submitting a run) gets a
    fresh trace id of its own, so the run's first audit row already carries the trace id.
    """
    if _Mode.passthrough:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
            if context.trace_state:
                headers["tracestate"] = context.trace_state.to_header()
    else:
        propagate.inject(headers)
    if start_trace and "traceparent" not in headers:
        headers["traceparent"] = new_traceparent()
    return headers


@functools.cache
def _tracer(service: str) -> trace.Tracer:
    # Looked up once per service: get_tracer costs more than the span it would start.
    return trace.get_tracer(f"warden.{service}")


@contextmanager
def consuming(service: str, name: str, headers: Mapping[str, str] | None, **attributes: Any) -> Iterator[trace.Span]:
    """A span for handling one message, continuing the trace its headers carry.

    Without headers it is a child of the current span (a step inside a message already traced).
    """
    if _Mode.passthrough and (parent := _remote_parent(headers)) is not None:
        # Nothing is recorded, so no span is made: the incoming context becomes current as it is
        # (a quarter of the cost of a non-recording span, on every message of every service).
        passed_on = trace.NonRecordingSpan(parent)
        with trace.use_span(passed_on, end_on_exit=False):
            yield passed_on
        return
    context = propagate.extract(dict(headers)) if headers is not None else None
    tracer = _tracer(service)
    with tracer.start_as_current_span(name, context=context, kind=trace.SpanKind.CONSUMER) as span:
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(f"warden.{key}", value)
        yield span


@contextmanager
def span(service: str, name: str, attributes: Mapping[str, Any], *, client: bool = False) -> Iterator[trace.Span]:
    """A span for work inside the current one, with the attributes given (those that are None left out).

    `client`: a call to another system (a model endpoint), as OpenTelemetry's GenAI conventions
    want for `chat` spans; otherwise internal work (an `execute_tool` span).
    """
    kind = trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL
    set_now = {key: value for key, value in attributes.items() if value is not None}
    with _tracer(service).start_as_current_span(name, kind=kind, attributes=set_now) as current:
        yield current


def _remote_parent(headers: Mapping[str, str] | None) -> trace.SpanContext | None:
    match = _TRACEPARENT.match(headers.get("traceparent", "")) if headers else None
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    state = headers.get("tracestate") if headers else None
    return trace.SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16)),
        trace_state=trace.TraceState.from_header([state]) if state else None,
    )


def trace_id_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The 32-hex trace id in a message's `traceparent` header, or None when absent or malformed."""
    if not headers:
        return None
    match = _TRACEPARENT.match(headers.get("traceparent", ""))
    return match.group(1) if match else None
