"""Thin subscriber logic: JetStream batch in, rows committed with the position, then one ack."""

import asyncio
import contextlib
import time
from collections.abc import Sequence

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import propagate, trace

from services.audit_projector.projection import StoredMessage
from services.audit_projector.store import RETRYABLE_DB_ERRORS, AuditStore
from shared.bus import fetch_batch
from shared.telemetry import spans_recorded

log = structlog.get_logger(__name__)

DURABLE_NAME = "audit_projector"
MAX_RETRY_DELAY_SECONDS = 10.0


def stored_message(message: Msg) -> StoredMessage:
    metadata = message.metadata
    return StoredMessage(
        stream=metadata.stream,
        seq=metadata.sequence.stream,
        subject=message.subject,
        headers=message.headers,
        data=message.data,
        stored_at=metadata.timestamp,
    )


async def reset_consumer(js: JetStreamContext, stream: str, filter_subject: str, start_seq: int, batch: int) -> None:
    """(Re)create the durable consumer to deliver from `start_seq`, the first message not in Postgres.

    Postgres, not the consumer's ack state, is the truth about what was projected (the position
    commits with the rows). Starting the consumer afresh there means a restart never sees an old
    batch redelivered after newer ones, so the position can only move forward over applied messages.
    """
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, DURABLE_NAME)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=DURABLE_NAME,
            name=DURABLE_NAME,
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            # One ack per batch: acking a batch's last message acknowledges all before it.
            ack_policy=AckPolicy.ALL,
            # The projector stores every message, even garbage, so it never gives one up:
            # redeliver without limit. A batch waits in memory while Postgres is away.
            max_deliver=-1,
            ack_wait=600.0,
            max_ack_pending=batch * 4,
        ),
    )


async def project_batch(store: AuditStore, stream: str, messages: Sequence[Msg]) -> None:
    """Apply a batch, waiting out Postgres outages with capped backoff; ack only after commit."""
    if not messages:
        return
    stored = [stored_message(message) for message in messages]
    started_ns = time.time_ns()
    delay = 0.1
    while True:
        try:
            applied = await store.apply(stream, stored)
            break
        except RETRYABLE_DB_ERRORS as exc:
            log.warning(
                "postgres unavailable, batch kept for retry",
                stream=stream,
                first_seq=stored[0].seq,
                retry_in_s=delay,
                error=repr(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
    await messages[-1].ack()
    _trace_projection(stored, started_ns)
    log.debug("batch projected", stream=stream, first_seq=stored[0].seq, last_seq=stored[-1].seq, applied=applied)


def _trace_projection(messages: Sequence[StoredMessage], started_ns: int) -> None:
    """One span per projected message, in the trace its headers carry, spanning its batch's write."""
    if not spans_recorded():
        return  # a non-recording span per message would cost a tenth of projecting it, for nothing
    tracer = trace.get_tracer("warden.audit-projector")
    ended_ns = time.time_ns()
    for message in messages:
        if message.headers and "traceparent" in message.headers:
            span = tracer.start_span(
                "audit_projector.project",
                context=propagate.extract(dict(message.headers)),
                kind=trace.SpanKind.CONSUMER,
                start_time=started_ns,
                attributes={"warden.stream": message.stream, "warden.stream_seq": message.seq},
            )
            span.end(end_time=ended_ns)


async def consume_stream(js: JetStreamContext, store: AuditStore, stream: str, batch: int, wait: float) -> None:
    """Fetch, project and ack batches in stream order until cancelled.

    A hand-written loop rather than FastStream's batch subscriber, which misses nats-py's
    timeout on an idle fetch (see `fetch_batch`) and so kills and restarts its task each time.
    """
    subscription = await js.pull_subscribe_bind(durable=DURABLE_NAME, stream=stream)
    try:
        while True:
            await project_batch(store, stream, await fetch_batch(subscription, batch, wait))
    finally:
        await subscription.unsubscribe()
