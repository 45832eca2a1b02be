"""Dead letters: how a message some consumer gave up on is put on the record, by whoever saw it go.

The audit projector records what the server's advisories report (a message delivered as often as
its consumer allows, or terminated by it); a consumer that gives up on a message which then
leaves its stream (the runner, on the work queue) records it itself first, with its bytes. Both
write the same `message.dead_lettered` event under the same idempotency key, so one giving-up
is stored once however many of them report it (within the events stream's duplicate window; past
it the `dead_letters` row's key still keeps one).
"""

import base64
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from warden.bus import envelope_headers, retry_transient
from warden.consumers import terminate
from warden.decoding import recordable_text
from warden.messages import MAX_DEAD_LETTER_RAW_BYTES, Envelope, MessageDeadLettered, make_envelope
from warden.subjects import SYSTEM_TENANT, Subjects


@dataclass(frozen=True)
class GivenUp:
    """Which consumer gave up on which stored message, why, and when."""

    stream: str
    stream_seq: int
    consumer: str
    reason: str
    deliveries: int | None
    at: datetime


@dataclass(frozen=True)
class Content:
    """What the stream held at that sequence: its subject and bytes."""

    subject: str
    data: bytes


def max_deliveries_reason(deliveries: int | None) -> str:
    times = f"{deliveries} times" if deliveries is not None else "as often as it allows"
    return f"max deliveries reached: delivered {times} and never acknowledged"


def terminated_reason(reason: str | None) -> str:
    return f"terminated by the consumer: {reason}" if reason else "terminated by the consumer (no reason given)"


def dead_letter_key(stream: str, stream_seq: int, consumer: str) -> str:
    """The event's Nats-Msg-Id: one per message and consumer, whoever reports it."""
    return f"dead-letter-{stream}-{stream_seq}-{consumer}"


def dead_letter_event(
    given_up: GivenUp, content: Content | None, *, source: str, missing: str | None = None
) -> Envelope[MessageDeadLettered]:
    """The event recording `given_up`, with the message's bytes when `content` has them.

    `missing` says why there is no content. Every text here may come from a consumer or a
    sender (a termination's reason, a subject), so each is made safe to store.
    """
    raw: str | None = None
    note = missing
    if content is not None:
        if len(content.data) <= MAX_DEAD_LETTER_RAW_BYTES:
            raw = base64.b64encode(content.data).decode()
        else:
            note = (
                f"{len(content.data)} bytes, more than a dead letter carries ({MAX_DEAD_LETTER_RAW_BYTES}); "
                f"see {given_up.stream} at sequence {given_up.stream_seq}"
            )
    elif note is None:
        note = f"not read from {given_up.stream}"
    data = MessageDeadLettered(
        stream=given_up.stream,
        stream_seq=given_up.stream_seq,
        consumer=_safe(given_up.consumer, 256),
        reason=_safe(given_up.reason, 2000) or "no reason given",
        deliveries=given_up.deliveries,
        given_up_at=given_up.at,
        message_subject=_safe(content.subject, 1024) if content is not None else None,
        raw=raw,
        raw_note=_safe(note, 2000) if note is not None else None,
    )
    return make_envelope(data, tenant=SYSTEM_TENANT, entity_id=given_up.stream, actor=source, source=source)


def _safe(text: str, limit: int) -> str:
    # Escaping a NUL lengthens the text: cut it to the field's limit again.
    return recordable_text(text, limit)[:limit]


async def record_dead_letter(
    js: JetStreamContext, subjects: Subjects, events_stream: str, event: Envelope[MessageDeadLettered]
) -> None:
    """Store the event in the events stream (passing bus failures waited out); raises if it cannot be."""
    data = event.data
    subject = subjects.expected_subject(event)
    headers = envelope_headers(event, dead_letter_key(data.stream, data.stream_seq, data.consumer))
    await retry_transient(
        lambda: js.publish(subject, event.to_bytes(), headers=headers, stream=events_stream),
        what=MessageDeadLettered.TYPE,
    )


async def give_up(
    js: JetStreamContext, subjects: Subjects, events_stream: str, message: Msg, reason: str, *, source: str
) -> None:
    """Record `message` as a dead letter with its bytes, then terminate it.

    For a message that leaves its stream once terminated (a work queue's): recorded first, so its
    bytes are on the record before they are gone. Should the record fail, the message is not
    terminated and comes back.
    """
    metadata = message.metadata
    given_up = GivenUp(
        stream=metadata.stream,
        stream_seq=metadata.sequence.stream,
        consumer=metadata.consumer,
        reason=terminated_reason(reason),
        deliveries=metadata.num_delivered,
        at=datetime.now(UTC),
    )
    event = dead_letter_event(given_up, Content(message.subject, message.data), source=source)
    await record_dead_letter(js, subjects, events_stream, event)
    await terminate(message, reason)


def raw_bytes(data: MessageDeadLettered) -> bytes | None:
    """The dead letter's message bytes, if it carries them."""
    return base64.b64decode(data.raw) if data.raw is not None else None
