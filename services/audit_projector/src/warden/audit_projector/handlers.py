"""Thin subscriber logic: JetStream batches in, contiguous rows committed with the position, then one ack.

The projector applies a stream's messages only in unbroken sequence order. When a delivery skips
sequences, it asks the stream whether they still exist: if they do, they were lost in flight (a
dropped connection, a leader change, a client-side overflow) and the consumer is re-created at
the stored position to fetch them again; if they do not, they were deleted or purged, and the gap
is recorded (a `stream.gap_detected` event and a `stream_gaps` row) before the projection moves
past it. Nothing is acknowledged that is not stored, so an acknowledgement never covers a hole.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import propagate, trace

from warden.audit_projector.projection import StoredMessage
from warden.audit_projector.store import RETRYABLE_DB_ERRORS, AuditStore
from warden.audit_projector.stream_reader import stored_message
from warden.bus import retry_transient
from warden.consumers import durable_pull, fetch_batch
from warden.telemetry import spans_recorded

log = structlog.get_logger(__name__)

DURABLE_NAME = "audit_projector"
MAX_RETRY_DELAY_SECONDS = 10.0
# Roughly how many bytes one batch may hold: batches shrink when messages are large, so a burst
# of 1 MiB messages is not a gigabyte in memory and in one transaction.
BATCH_BYTES = 32 * 1024 * 1024
# What nats-py may buffer for the consumer before it drops messages; a dropped message is a gap
# the projector finds and fetches again, so this bounds memory, not correctness.
PENDING_BYTES_LIMIT = 2 * BATCH_BYTES

# How often an idle projector asks whether the stream holds messages it never received (see `run`).
IDLE_CHECK_SECONDS = 1.0

GapRecorder = Callable[[str, int, int], Awaitable[None]]


async def reset_consumer(
    js: JetStreamContext, stream: str, filter_subject: str, start_seq: int, batch: int
) -> JetStreamContext.PullSubscription:
    """(Re)create the durable consumer to deliver from `start_seq`, the first message not in Postgres,
    and bind a pull subscription to it.

    Postgres, not the consumer's ack state, is the truth about what was projected (the position
    commits with the rows). Starting the consumer afresh there means a restart never sees an old
    batch redelivered after newer ones, so the position can only move forward over applied messages.
    """
    return await durable_pull(
        js,
        stream,
        ConsumerConfig(
            durable_name=DURABLE_NAME,
            name=DURABLE_NAME,
            filter_subject=filter_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            # One ack per batch: acking a batch's last message acknowledges all before it, which
            # is safe only because every batch is checked to follow the stored position.
            ack_policy=AckPolicy.ALL,
            # The projector stores every message, even garbage, so it never gives one up:
            # redeliver without limit. A batch waits in memory while Postgres is away.
            max_deliver=-1,
            ack_wait=600.0,
            max_ack_pending=batch * 4,
        ),
        existing="replace",
        pending_bytes_limit=PENDING_BYTES_LIMIT,
    )


@dataclass(frozen=True)
class Split:
    """A fetched batch cut where it stops following the stored position."""

    applicable: list[Msg]  # up to the first hole (including any already applied, which the store skips)
    after_gap: list[Msg]  # from the first message past the hole
    gap: tuple[int, int] | None  # the missing sequences, first and last


def split_at_gap(messages: Sequence[Msg], position: int) -> Split:
    """Cut `messages` (in delivery order) at the first sequence that does not follow `position`."""
    expected = position + 1
    for index, message in enumerate(messages):
        seq = message.metadata.sequence.stream
        if seq > expected:
            return Split(list(messages[:index]), list(messages[index:]), (expected, seq - 1))
        expected = max(expected, seq + 1)
    return Split(list(messages), [], None)


def next_batch_size(messages: Sequence[Msg], most: int) -> int:
    """How many messages to ask for next: `most`, fewer when recent messages were large."""
    largest = max((len(message.data) for message in messages), default=0)
    return max(1, min(most, BATCH_BYTES // max(largest, 1)))


async def project_batch(store: AuditStore, stream: str, messages: Sequence[Msg]) -> None:
    """Apply a contiguous batch, waiting out Postgres outages with capped backoff; ack only after commit."""
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


async def still_stored(js: JetStreamContext, stream: str, filter_subject: str, first: int, last: int) -> bool:
    """Whether any of the sequences `first`..`last` is still in the stream.

    When the stream cannot be asked, the answer is yes: fetching again is always safe, while
    recording a gap that is not there would hide messages from the audit.
    """
    try:
        found = await js.get_msg(stream, first, subject=filter_subject, next=True)
    except NotFoundError:
        return False
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("could not ask the stream about missing messages; fetching again", stream=stream, error=repr(exc))
        return True
    return found.seq is not None and found.seq <= last


class StreamProjection:
    """One audited stream projected into Postgres in unbroken sequence order."""

    def __init__(
        self,
        js: JetStreamContext,
        store: AuditStore,
        stream: str,
        filter_subject: str,
        *,
        batch: int,
        wait: float,
        record_gap: GapRecorder,
    ) -> None:
        self.js = js
        self.store = store
        self.stream = stream
        self.filter_subject = filter_subject
        self.batch = batch
        self.wait = wait
        self.record_gap = record_gap

    async def _subscribe(self, position: int) -> JetStreamContext.PullSubscription:
        return await retry_transient(
            lambda: reset_consumer(self.js, self.stream, self.filter_subject, position + 1, self.batch),
            what=f"the projector's consumer on {self.stream}",
        )

    async def _resubscribe(
        self, subscription: JetStreamContext.PullSubscription, position: int
    ) -> JetStreamContext.PullSubscription:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
        return await self._subscribe(position)

    async def _missed(self, position: int) -> bool:
        """Whether the stream holds messages past `position` that the consumer delivered and this process lost.

        Lost messages at the end of the stream leave no later message to reveal the hole, and the
        consumer would redeliver them only after its ack wait: so an idle projector asks.
        """
        try:
            last_seq = (await self.js.stream_info(self.stream)).state.last_seq
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not ask the stream how far it goes", stream=self.stream, error=repr(exc))
            return False
        return last_seq > position and await still_stored(
            self.js, self.stream, self.filter_subject, position + 1, last_seq
        )

    async def run(self, position: int) -> None:
        """Fetch, project and ack batches from `position` + 1 until cancelled.

        A hand-written loop rather than FastStream's batch subscriber, which misses nats-py's
        timeout on an idle fetch (see `fetch_batch`) and so kills and restarts its task each time.
        """
        subscription = await self._subscribe(position)
        size = self.batch
        checked_at = time.monotonic()
        try:
            while True:
                messages = await fetch_batch(subscription, size, self.wait)
                if not messages and time.monotonic() - checked_at >= IDLE_CHECK_SECONDS:
                    checked_at = time.monotonic()
                    if await self._missed(position):
                        log.warning("messages lost in flight; fetching again", stream=self.stream, after_seq=position)
                        subscription = await self._resubscribe(subscription, position)
                    continue
                size = next_batch_size(messages, self.batch) if messages else size
                while messages:
                    split = split_at_gap(messages, position)
                    await project_batch(self.store, self.stream, split.applicable)
                    if split.applicable:
                        position = max(position, split.applicable[-1].metadata.sequence.stream)
                    if split.gap is None:
                        break
                    first, last = split.gap
                    if await still_stored(self.js, self.stream, self.filter_subject, first, last):
                        log.warning("messages lost in flight; fetching again", stream=self.stream, first_seq=first)
                        subscription = await self._resubscribe(subscription, position)
                        break
                    log.error("messages missing from the stream", stream=self.stream, first_seq=first, last_seq=last)
                    await self.record_gap(self.stream, first, last)
                    position = last
                    messages = split.after_gap
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
