"""The audit projector's advisories consumer: the server's advisories on messages consumers gave up on,
recorded as dead letters, through a FastStream subscriber.

The provisioned `<STEM>_ADVISORIES` stream captures the max-deliveries and terminated advisories
about this installation's streams. The projector reads it through the durable consumer
`audit_projector`, reads each message given up on from its stream (while it is still there), and
records a `message.dead_lettered` event, which its projection turns into a `dead_letters` row like
any other event: so dead letters are part of the audit trail and come back in a replay.

A FastStream subscriber (`advisories_router`) rather than `warden.consumers`: advisories are rare,
so what FastStream costs per message (10 to 15 times the hand-written loop's CPU, see
`warden.consumers`) does not matter here, and the handler has unit tests on FastStream's in-memory
broker (tests/test_advisories_handler.py).

Pull, not push: installations keep the pull consumer they have, whose acknowledgements say what is
recorded, and nats-server refuses to turn a pull consumer into a push one ("can not update pull
consumer to push based"): push would mean a new consumer delivering up to 30 days of advisories
again. Pulled one at a time (`PullSub(batch_size=1)`), which also keeps their order: nats-py
2.16's single-message fetch raises only `nats.errors.TimeoutError` on an idle stream, which
FastStream 0.7.8's pull loop catches, while its batch fetch raises the builtin TimeoutError when
the server's "408 request timeout" arrives in the last 0.1 ms before nats-py's own timer fires,
which ends the loop's task: FastStream's supervisor starts another at once, logging "callback for
Task-N is being executed..." at INFO and the TimeoutError with its traceback at ERROR (at most once
an hour). Over 180 s on an idle stream with 1 s fetches, batches of 64 lost their task once (181
fetches; none in another 180 s with a busy event loop), batches of one never (360 fetches). That
INFO line still comes once per stop, when FastStream cancels the task.

What FastStream's pull loop does worse than `warden.consumers`: when the consumer does not answer
(nats-server's "503 no responders": the consumer deleted, or on a cluster no leader while one is
elected) it asks again at once, thousands of times a second, where the hand-written loop pauses:
a deleted consumer kept the projector at about 0.7 CPU until `watch_ground` noticed, 20 s later,
and the process exited to be restarted. And should the consumer vanish between `set_up_consumer`
and the subscriber's start, FastStream creates it again (its filter ADVISORY_SUBJECT).

Acknowledgement (AckPolicy.MANUAL: the handler decides): an advisory is acknowledged once its
dead letter event is stored; nak'd with a delay of RETRY_DELAY_SECONDS when the message cannot be
read or the event cannot be stored, so it waits in its stream and comes back (never given up on:
max_deliver -1); acknowledged and passed over, with an error logged, when it names no message or
no dead letter can record it. A handler that fails unexpectedly leaves it unacknowledged, to come
back after the ack wait.
"""

import asyncio
from collections.abc import Callable
from datetime import datetime

import nats.errors
import structlog
from faststream import AckPolicy
from faststream.nats import JStream, NatsRouter, PullSub
from faststream.nats.annotations import NatsMessage as NatsMessageArgument
from faststream.nats.message import NatsMessage
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as ConsumerAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from warden.bus import retry_transient
from warden.consumers import set_up_durable, watch_ground
from warden.dead_letters import (
    Content,
    GivenUp,
    dead_letter_event,
    max_deliveries_reason,
    record_dead_letter,
    terminated_reason,
)
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import is_transient

log = structlog.get_logger(__name__)

DURABLE_NAME = "audit_projector"
MAX_DELIVERIES_TYPE = "io.nats.jetstream.advisory.v1.max_deliver"
TERMINATED_TYPE = "io.nats.jetstream.advisory.v1.terminated"
# What the subscriber declares it reads: both kinds of advisory, about any stream and consumer. The
# consumer itself has no filter (the stream holds only this installation's advisories); FastStream
# would make this its filter only if it had to create the consumer, which `set_up_consumer` does first.
ADVISORY_SUBJECT = "$JS.EVENT.ADVISORY.CONSUMER.>"
# Its subscriber's name in the AsyncAPI document, beside the channels the services declare (warden.channels).
ADVISORIES_TITLE = "audit-projector.receives.advisories"
# An advisory whose event cannot be stored now (the events stream full, say) comes back after this.
RETRY_DELAY_SECONDS = 5.0
FETCH_WAIT_SECONDS = 1.0
STREAM_MISSING_RETRY_SECONDS = 30.0
# Unacknowledged advisories the server lets the consumer hold; as the consumer was created with.
MAX_ACK_PENDING = 256


def consumer_config() -> ConsumerConfig:
    """The durable consumer's settings (a fresh object: nats-py and FastStream fill in what they use)."""
    return ConsumerConfig(
        durable_name=DURABLE_NAME,
        name=DURABLE_NAME,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ConsumerAckPolicy.EXPLICIT,
        # Never given up on: an advisory not recorded yet is delivered until it is.
        max_deliver=-1,
        ack_wait=60.0,
        max_ack_pending=MAX_ACK_PENDING,
    )


class ConsumerAdvisory(BaseModel):
    """The fields Warden reads from either advisory (the server sends more, and may add fields)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    timestamp: datetime
    stream: str
    consumer: str
    stream_seq: int = Field(ge=1)
    deliveries: int | None = Field(default=None, ge=0)
    reason: str | None = None  # a termination's, as the consumer gave it


def read_advisory(data: bytes) -> GivenUp:
    """What an advisory says was given up on; ValueError when it is not one of the two kinds."""
    try:
        advisory = ConsumerAdvisory.model_validate_json(data)
    except ValidationError as exc:
        raise ValueError(f"not a consumer advisory: {exc.error_count()} invalid fields") from None
    if advisory.type == MAX_DELIVERIES_TYPE:
        reason = max_deliveries_reason(advisory.deliveries)
    elif advisory.type == TERMINATED_TYPE:
        reason = terminated_reason(advisory.reason)
    else:
        raise ValueError(f"an advisory of type {advisory.type!r}, not one about a message given up on")
    return GivenUp(
        stream=advisory.stream,
        stream_seq=advisory.stream_seq,
        consumer=advisory.consumer,
        reason=reason,
        deliveries=advisory.deliveries,
        at=advisory.timestamp,
    )


class AdvisoryRecorder:
    """Turns one captured advisory into a `message.dead_lettered` event, and acknowledges it as it went.

    `jetstream` gives the context to read messages and store events with: the broker's, once it is
    connected (a stand-in in the handler's tests).
    """

    def __init__(
        self, jetstream: Callable[[], JetStreamContext], subjects: Subjects, streams: StreamNames, *, source: str
    ) -> None:
        self.jetstream = jetstream
        self.subjects = subjects
        self.streams = streams
        self.source = source

    async def handle(self, message: NatsMessage) -> None:
        """Record one advisory's dead letter, then acknowledge it; on failure, nak it to come back later."""
        advisory_seq = message.raw_message.metadata.sequence.stream
        try:
            given_up = read_advisory(message.body)
        except ValueError as exc:
            # Only the server publishes on the advisory subjects (no identity may): nothing to record
            # it as, and it stays in the advisories stream for whoever looks.
            log.error(
                "an advisory that names no message; passed over",
                advisory_seq=advisory_seq,
                subject=message.raw_message.subject,
                error=str(exc),
            )
            await message.ack()
            return
        js = self.jetstream()
        try:
            content, missing = await _content(js, given_up)
            event = dead_letter_event(given_up, content, source=self.source, missing=missing)
        except ValueError as exc:
            # Names no event can hold (not one of this installation's streams, say): retrying would
            # stop every advisory behind it, so it is passed over, loudly, and stays in its stream.
            log.error(
                "an advisory no dead letter can record; passed over",
                advisory_seq=advisory_seq,
                stream=given_up.stream,
                stream_seq=given_up.stream_seq,
                error=str(exc),
            )
            await message.ack()
            return
        except (nats.errors.Error, TimeoutError) as exc:
            log.error(
                "could not read the message of a dead letter; it will be tried again",
                stream=given_up.stream,
                stream_seq=given_up.stream_seq,
                retry_in_s=RETRY_DELAY_SECONDS,
                error=repr(exc),
            )
            await message.nack(delay=RETRY_DELAY_SECONDS)
            return
        try:
            await record_dead_letter(js, self.subjects, self.streams.events, event)
        except (nats.errors.Error, TimeoutError) as exc:
            log.error(
                "could not record a dead letter; it will be tried again",
                stream=given_up.stream,
                stream_seq=given_up.stream_seq,
                consumer=given_up.consumer,
                retry_in_s=RETRY_DELAY_SECONDS,
                error=repr(exc),
            )
            await message.nack(delay=RETRY_DELAY_SECONDS)
            return
        log.warning(
            "dead letter recorded",
            stream=given_up.stream,
            stream_seq=given_up.stream_seq,
            consumer=given_up.consumer,
            reason=given_up.reason,
            raw=content is not None,
        )
        await message.ack()


async def _content(js: JetStreamContext, given_up: GivenUp) -> tuple[Content | None, str | None]:
    """The message as its stream holds it, or None and why not."""
    try:
        stored = await retry_transient(
            lambda: js.get_msg(given_up.stream, given_up.stream_seq),
            what=f"{given_up.stream} sequence {given_up.stream_seq}",
        )
    except NotFoundError:
        # A work queue drops a message once its consumer terminates it (the runner records those
        # itself, bytes and all, under the same key); a stream's limits may have removed it too.
        return None, f"no longer in {given_up.stream} when the advisory was read"
    except nats.errors.Error as exc:
        if is_transient(exc):
            raise
        return None, f"could not be read from {given_up.stream}: {exc!r}"
    return Content(stored.subject or "", stored.data or b""), None


def advisories_router(recorder: AdvisoryRecorder, streams: StreamNames, *, inbox_prefix: str) -> NatsRouter:
    """A router holding the advisories subscriber, bound to the durable consumer `set_up_consumer` makes.

    A router of its own, included in the running broker and started by the projector itself once
    the consumer is set up (see `_record_advisories` in warden.audit_projector.app), so that a
    passing bus failure at that moment is waited out rather than failing the broker's start-up.
    `inbox_prefix` is the
    connection's: FastStream 0.7.8 gives nats-py its own default (`_INBOX.`) for the pull
    subscription's inbox, which a Warden identity may not subscribe to.
    """
    router = NatsRouter()
    subscriber = router.subscriber(
        ADVISORY_SUBJECT,
        stream=JStream(streams.advisories, declare=False),
        durable=DURABLE_NAME,
        config=consumer_config(),
        pull_sub=PullSub(batch_size=1, timeout=FETCH_WAIT_SECONDS),
        inbox_prefix=f"{inbox_prefix}.".encode(),
        ack_policy=AckPolicy.MANUAL,
        title=ADVISORIES_TITLE,
        description="The server's max-deliveries and terminated advisories, each recorded as message.dead_lettered.",
    )

    @subscriber
    async def record_advisory(message: NatsMessageArgument) -> None:
        await recorder.handle(message)

    return router


async def set_up_consumer(js: JetStreamContext, streams: StreamNames) -> bool:
    """Create the durable consumer, or update it to `consumer_config` (its acknowledgements kept).

    False, logged, when there is no advisories stream: an installation provisioned before dead
    letters were recorded, whose audit goes on meanwhile.
    """
    try:
        await retry_transient(
            lambda: set_up_durable(js, streams.advisories, consumer_config(), existing="update"),
            what=f"the projector's consumer on {streams.advisories}",
        )
    except NotFoundError:
        log.error(
            "no advisories stream: dead letters are not recorded until `warden provision` creates it",
            stream=streams.advisories,
            retry_in_s=STREAM_MISSING_RETRY_SECONDS,
        )
        return False
    return True


async def set_up_once_provisioned(js: JetStreamContext, streams: StreamNames) -> None:
    """Try `set_up_consumer` again every STREAM_MISSING_RETRY_SECONDS until the advisories stream exists."""
    while True:
        await asyncio.sleep(STREAM_MISSING_RETRY_SECONDS)
        if await set_up_consumer(js, streams):
            return


async def watch_consumer(js: JetStreamContext, streams: StreamNames) -> None:
    """Raise `GroundLost` once the consumer, or its stream, is gone (see `warden.consumers.watch_ground`)."""
    await watch_ground(
        lambda: js.consumer_info(streams.advisories, DURABLE_NAME),
        f"the consumer {DURABLE_NAME} on {streams.advisories}",
    )
