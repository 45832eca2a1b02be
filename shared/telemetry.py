"""OpenTelemetry set-up and W3C trace context carried in NATS message headers."""

import os
import re
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def configure_tracing(service: str) -> TracerProvider:
    """Install a tracer provider for this process; export over OTLP when an endpoint is configured."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        # Imported lazily: the exporter pulls in gRPC, which nobody without a collector needs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def inject_trace_context(headers: dict[str, str]) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) for the current span to outgoing message headers."""
    propagate.inject(headers)
    return headers


def trace_id_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The 32-hex trace id in a message's `traceparent` header, or None when absent or malformed."""
    if not headers:
        return None
    match = _TRACEPARENT.match(headers.get("traceparent", ""))
    return match.group(1) if match else None
