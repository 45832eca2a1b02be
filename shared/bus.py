"""Publishing envelopes to JetStream: the headers every Warden message carries, in one place."""

import asyncio
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

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


async def fetch_batch(subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages from a pull subscription, or [] when none came within `wait` seconds.

    Catches nats-py 2.16's asyncio.TimeoutError from an idle multi-message fetch (which
    FastStream 0.7.8's pull loop misses), but never swallows a cancellation: one that lands
    inside nats-py's own wait_for can surface as a TimeoutError, and a loop that took it for
    "no messages" would never stop.
    """
    try:
        return await subscription.fetch(batch, timeout=wait)
    except (TimeoutError, nats.errors.TimeoutError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []
