"""Publishing envelopes to JetStream: the headers every Warden message carries, in one place."""

from typing import Any

from shared.messages import Envelope
from shared.telemetry import inject_trace_context

MSG_ID_HEADER = "Nats-Msg-Id"
TYPE_HEADER = "Warden-Type"


def envelope_headers(
    envelope: Envelope[Any], idempotency_key: str | None = None, *, start_trace: bool = False
) -> dict[str, str]:
    """Headers for one message: JetStream's dedup key, the type (for routing without parsing), trace context.

    The idempotency key defaults to the envelope id, so a retried publish of the same envelope is
    stored once; clients pass their own key to make a retried *request* idempotent too.
    """
    headers = {
        MSG_ID_HEADER: idempotency_key or envelope.id,
        TYPE_HEADER: envelope.type,
        "content-type": "application/json",
    }
    return inject_trace_context(headers, start_trace=start_trace)
