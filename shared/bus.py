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


def command_key_scope(tenant: str, type_name: str) -> str:
    """What every command's Nats-Msg-Id starts with (see `envelope_headers`)."""
    return f"{tenant}:{type_name}:"


def envelope_headers(
    envelope: Envelope[Any], idempotency_key: str | None = None, *, start_trace: bool = False
) -> dict[str, str]:
    """Headers for one message: JetStream's dedup key, the type (for routing without parsing), trace context.

    The idempotency key defaults to the envelope id, so a retried publish of the same envelope is
    stored once; clients pass their own key to make a retried *request* idempotent too. JetStream
    deduplicates over the whole stream, so a command's key is scoped by its tenant and type
    (`acme:run.submitted:ticket-42`): two tenants using the same key never collide, and the gate
    refuses a command whose key claims another tenant's scope.
    """
    key = idempotency_key or envelope.id
    if envelope.data.KIND == "command":
        key = command_key_scope(envelope.tenant, envelope.type) + key
    headers = {
        MSG_ID_HEADER: key,
        TYPE_HEADER: envelope.type,
        "content-type": "application/json",
    }
    return inject_trace_context(headers, start_trace=start_trace)


# How long to wait for the server's answer when taking what else is already waiting.
_DRAIN_SECONDS = 0.005


async def fetch_batch(subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages: block up to `wait` seconds for the first, then take what else is waiting.

    nats-py's own multi-message fetch, once it has to long-poll, holds what it got until the batch
    is full or the timeout ends, so a quiet stream stalls every batch; asking for one message,
    then for the rest with a tiny timeout, returns as soon as the stream has nothing more.
    Timeouts mean "nothing yet" (including nats-py 2.16's asyncio.TimeoutError, which FastStream
    0.7.8's pull loop misses), but a cancellation is never swallowed: one that lands inside
    nats-py's own wait_for can surface as a TimeoutError, and a loop that took it for "no
    messages" would never stop.
    """
    messages = await _fetch(subscription, 1, wait)
    if messages and batch > 1:
        messages += await _fetch(subscription, batch - 1, _DRAIN_SECONDS)
    return messages


async def _fetch(subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    try:
        return await subscription.fetch(batch, timeout=wait)
    except (TimeoutError, nats.errors.TimeoutError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []
