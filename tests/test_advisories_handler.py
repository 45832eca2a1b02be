"""The projector's advisories handler on FastStream's in-memory broker: what each advisory becomes, and
how it is acknowledged.

`TestNatsBroker` runs the projector's own subscriber and handler (`advisories_router`) with no
servers; a middleware keeps each delivered message, whose FastStream state says whether the handler
acked or nak'd it, and what it asked nats-py to tell the server. The JetStream context the handler
reads messages from and stores events in is a stand-in holding both. What only servers can show
(the advisory coming back after a nak, the duplicate window, the projection) is in
tests/test_dead_letters.py.
"""

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from faststream import BaseMiddleware
from faststream.message import AckStatus, StreamMessage
from faststream.nats import NatsBroker, TestNatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck, RawStreamMsg
from nats.js.errors import BadRequestError, NotFoundError
from structlog.testing import capture_logs

from warden.audit_projector.advisories import (
    ADVISORY_SUBJECT,
    DURABLE_NAME,
    MAX_DELIVERIES_TYPE,
    RETRY_DELAY_SECONDS,
    TERMINATED_TYPE,
    AdvisoryRecorder,
    advisories_router,
)
from warden.dead_letters import dead_letter_key
from warden.messages import MessageDeadLettered, parse_envelope
from warden.streams import MAX_DELIVERIES_ADVISORY, TERMINATED_ADVISORY, StreamNames
from warden.subjects import SYSTEM_TENANT, Subjects
from warden.wire import MSG_ID_HEADER

SUBJECTS = Subjects("tadv")
STREAMS = StreamNames.for_prefix("tadv")
GIVEN_UP_AT = "2025-01-02T03:04:05.123456789Z"
COMMAND_SUBJECT = SUBJECTS.command("acme", "run.submitted", "alice")


@dataclass
class Stored:
    subject: str
    payload: bytes
    headers: dict[str, str]
    stream: str | None


@dataclass
class FakeJetStream:
    """Stands in for the JetStream context: the messages streams hold, and the events stored."""

    messages: dict[tuple[str, int], RawStreamMsg] = field(default_factory=dict)
    stored: list[Stored] = field(default_factory=list)
    refuse: Exception | None = None  # what publishing raises, when set

    async def get_msg(self, stream_name: str, seq: int | None = None, **_: Any) -> RawStreamMsg:
        try:
            return self.messages[(stream_name, seq or 0)]
        except KeyError:
            raise NotFoundError(code=404, err_code=10037, description="no message found") from None

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,  # noqa: ASYNC109 - nats-py's signature
        stream: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        if self.refuse is not None:
            raise self.refuse
        self.stored.append(Stored(subject, payload, dict(headers or {}), stream))
        return PubAck(stream=stream or "", seq=len(self.stored))


@dataclass
class Delivered:
    """A message as the handler left it: FastStream's state, and what nats-py was asked to send."""

    message: StreamMessage[Msg]
    replies: list[tuple[str, float | None]]


class Projector:
    """The advisories subscriber on an in-memory broker, with the stand-in JetStream context."""

    def __init__(self) -> None:
        self.js = FakeJetStream()
        self.delivered: list[Delivered] = []
        self.broker = NatsBroker(middlewares=[self._remembering()])
        js = cast(JetStreamContext, self.js)
        recorder = AdvisoryRecorder(lambda: js, SUBJECTS, STREAMS, source="audit-projector")
        self.broker.include_router(advisories_router(recorder, STREAMS, inbox_prefix="_INBOX"))
        self._sequence = 0

    def _remembering(self) -> type[BaseMiddleware]:
        delivered = self.delivered

        class Remember(BaseMiddleware):
            async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
                replies: list[tuple[str, float | None]] = []
                raw: Msg = msg.raw_message
                ack, nak = raw.ack, raw.nak

                async def acked() -> None:
                    replies.append(("ack", None))
                    await ack()

                async def nakd(delay: float | None = None) -> None:
                    replies.append(("nak", delay))
                    await nak(delay)

                raw.ack, raw.nak = acked, nakd  # type: ignore[method-assign]
                delivered.append(Delivered(msg, replies))
                return await call_next(msg)

        return Remember

    async def deliver(self, subject: str, advisory: bytes) -> Delivered:
        """Publish `advisory` as the advisories consumer delivers it (its ack subject names the sequence)."""
        self._sequence += 1
        seq = self._sequence
        ack_subject = f"$JS.ACK.{STREAMS.advisories}.{DURABLE_NAME}.1.{seq}.{seq}.1735787045000000000.0"
        await self.broker.publish(advisory, subject, reply_to=ack_subject)
        return self.delivered[-1]


@pytest.fixture
async def projector() -> AsyncIterator[Projector]:
    projector = Projector()
    async with TestNatsBroker(projector.broker):
        yield projector


def advisory(kind: str, stream: str, stream_seq: int, consumer: str, **fields: Any) -> bytes:
    """An advisory as nats-server writes it (with fields Warden does not read)."""
    document = {
        "type": kind,
        "id": "gq4MDr9OZ3E6uVS7iUdrJt",
        "timestamp": GIVEN_UP_AT,
        "stream": stream,
        "consumer": consumer,
        "consumer_seq": 9,
        "stream_seq": stream_seq,
        "deliveries": 2,
        "domain": "",
        **fields,
    }
    return json.dumps(document).encode()


def stored_dead_letter(stored: Stored) -> MessageDeadLettered:
    event = parse_envelope(stored.payload)
    assert (event.type, event.tenant, event.entity_id) == (MessageDeadLettered.TYPE, SYSTEM_TENANT, event.data.stream)
    assert stored.subject == SUBJECTS.expected_subject(event)
    assert stored.stream == STREAMS.events
    data = event.data
    assert isinstance(data, MessageDeadLettered)
    assert stored.headers[MSG_ID_HEADER] == dead_letter_key(data.stream, data.stream_seq, data.consumer)
    return data


def test_the_subscriber_declares_both_kinds_of_advisory() -> None:
    """The subject the subscriber declares takes in both advisories the stream captures."""
    for advisory_subject in (MAX_DELIVERIES_ADVISORY, TERMINATED_ADVISORY):
        assert advisory_subject.startswith(ADVISORY_SUBJECT.removesuffix(">"))


async def test_a_max_deliveries_advisory_is_stored_as_a_dead_letter_with_its_bytes_then_acked(
    projector: Projector,
) -> None:
    """The message the advisory names is read from its stream and recorded, bytes and all, under its
    idempotency key; only then is the advisory acked."""
    body = b'{"not": "an envelope"}'
    projector.js.messages[(STREAMS.commands, 7)] = RawStreamMsg(subject=COMMAND_SUBJECT, seq=7, data=body)

    with capture_logs() as logs:
        delivered = await projector.deliver(
            f"{MAX_DELIVERIES_ADVISORY}.{STREAMS.commands}.flaky",
            advisory(MAX_DELIVERIES_TYPE, STREAMS.commands, 7, "flaky", deliveries=2),
        )

    [stored] = projector.js.stored
    data = stored_dead_letter(stored)
    assert (data.stream, data.stream_seq, data.consumer, data.deliveries) == (STREAMS.commands, 7, "flaky", 2)
    assert data.reason == "max deliveries reached: delivered 2 times and never acknowledged"
    assert data.raw is not None
    assert (base64.b64decode(data.raw), data.message_subject, data.raw_note) == (body, COMMAND_SUBJECT, None)
    assert data.given_up_at == datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert (delivered.message.committed, delivered.replies) == (AckStatus.ACKED, [("ack", None)])
    [line] = [line for line in logs if line["event"] == "dead letter recorded"]
    assert (line["log_level"], line["stream_seq"], line["raw"]) == ("warning", 7, True)


async def test_a_terminated_advisory_carries_the_consumers_reason(projector: Projector) -> None:
    """A termination's reason, as the consumer gave it, becomes the dead letter's; the advisory is acked."""
    projector.js.messages[(STREAMS.commands, 3)] = RawStreamMsg(subject=COMMAND_SUBJECT, seq=3, data=b"x")

    delivered = await projector.deliver(
        f"{TERMINATED_ADVISORY}.{STREAMS.commands}.policy_gate",
        advisory(TERMINATED_TYPE, STREAMS.commands, 3, "policy_gate", deliveries=5, reason="its answer was refused"),
    )

    [stored] = projector.js.stored
    data = stored_dead_letter(stored)
    assert (data.consumer, data.deliveries) == ("policy_gate", 5)
    assert data.reason == "terminated by the consumer: its answer was refused"
    assert delivered.replies == [("ack", None)]


async def test_a_message_gone_from_its_stream_is_recorded_with_why_its_bytes_are_missing(
    projector: Projector,
) -> None:
    """A message no longer in its stream (a work queue drops what is terminated) is recorded without
    bytes, saying why; the advisory is acked."""
    delivered = await projector.deliver(
        f"{TERMINATED_ADVISORY}.{STREAMS.work}.agent_runner",
        advisory(TERMINATED_TYPE, STREAMS.work, 4, "agent_runner", deliveries=1, reason="invalid work item"),
    )

    [stored] = projector.js.stored
    data = stored_dead_letter(stored)
    assert (data.raw, data.message_subject) == (None, None)
    assert data.raw_note == f"no longer in {STREAMS.work} when the advisory was read"
    assert delivered.replies == [("ack", None)]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param(
            advisory("io.nats.jetstream.advisory.v1.consumer_action", STREAMS.commands, 1, "flaky"),
            "an advisory of type 'io.nats.jetstream.advisory.v1.consumer_action', not one about a message given up on",
            id="another-type",
        ),
        pytest.param(b"{not json", "not a consumer advisory: 1 invalid fields", id="invalid-json"),
    ],
)
async def test_an_advisory_that_names_no_message_is_acked_and_passed_over(
    projector: Projector, body: bytes, error: str
) -> None:
    """Nothing is recorded for it, an error says so, and it is acked rather than delivered for ever."""
    with capture_logs() as logs:
        delivered = await projector.deliver(f"{MAX_DELIVERIES_ADVISORY}.{STREAMS.commands}.flaky", body)

    assert projector.js.stored == []
    assert (delivered.message.committed, delivered.replies) == (AckStatus.ACKED, [("ack", None)])
    [line] = [line for line in logs if line["event"] == "an advisory that names no message; passed over"]
    assert (line["log_level"], line["advisory_seq"], line["error"]) == ("error", 1, error)


async def test_an_advisory_no_dead_letter_can_record_is_acked_and_passed_over(projector: Projector) -> None:
    """An advisory naming what no event can hold (a stream name that is not a subject token) would stop
    every advisory behind it if retried: it is acked, and an error names it."""
    with capture_logs() as logs:
        delivered = await projector.deliver(
            f"{MAX_DELIVERIES_ADVISORY}.{STREAMS.commands}.flaky",
            advisory(MAX_DELIVERIES_TYPE, "NOT A TOKEN", 2, "flaky"),
        )

    assert projector.js.stored == []
    assert delivered.replies == [("ack", None)]
    [line] = [line for line in logs if line["event"] == "an advisory no dead letter can record; passed over"]
    assert (line["stream"], line["stream_seq"]) == ("NOT A TOKEN", 2)


async def test_an_advisory_whose_dead_letter_cannot_be_stored_is_nakd_with_a_delay_until_it_can_be(
    projector: Projector,
) -> None:
    """The events stream refusing the record naks the advisory with RETRY_DELAY_SECONDS, unacknowledged;
    delivered again once the stream takes it, it is recorded and acked."""
    projector.js.messages[(STREAMS.commands, 5)] = RawStreamMsg(subject=COMMAND_SUBJECT, seq=5, data=b"x")
    projector.js.refuse = BadRequestError(code=400, err_code=10054, description="message size exceeds maximum allowed")
    subject = f"{MAX_DELIVERIES_ADVISORY}.{STREAMS.commands}.flaky"
    body = advisory(MAX_DELIVERIES_TYPE, STREAMS.commands, 5, "flaky")

    with capture_logs() as logs:
        refused = await projector.deliver(subject, body)

    assert projector.js.stored == []
    assert (refused.message.committed, refused.replies) == (AckStatus.NACKED, [("nak", RETRY_DELAY_SECONDS)])
    [line] = [line for line in logs if line["event"] == "could not record a dead letter; it will be tried again"]
    assert (line["log_level"], line["retry_in_s"]) == ("error", RETRY_DELAY_SECONDS)

    projector.js.refuse = None
    again = await projector.deliver(subject, body)
    assert len(projector.js.stored) == 1
    assert again.replies == [("ack", None)]
