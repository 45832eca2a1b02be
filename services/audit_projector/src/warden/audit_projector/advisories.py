"""The server's advisories on messages consumers gave up on, recorded as dead letters.

The provisioned `<STEM>_ADVISORIES` stream captures the max-deliveries and terminated advisories
about this installation's streams. The projector reads it through a durable consumer, reads each
message given up on from its stream (while it is still there), and records a
`message.dead_lettered` event, which its projection turns into a `dead_letters` row like any
other event: so dead letters are part of the audit trail and come back in a replay. An advisory is
acknowledged only once its event is stored, and never given up on.
"""

import asyncio
import contextlib
from datetime import datetime

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from warden.bus import retry_transient
from warden.consumers import durable_pull, fetch_batch, watch_ground
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
# An advisory whose event cannot be stored now (the events stream full, say) comes back after this.
RETRY_DELAY_SECONDS = 5.0
FETCH_WAIT_SECONDS = 1.0
STREAM_MISSING_RETRY_SECONDS = 30.0
BATCH = 64


class _Advisory(BaseModel):
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
        advisory = _Advisory.model_validate_json(data)
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
    """Turns each captured advisory into a `message.dead_lettered` event, in order, one at a time."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, streams: StreamNames, *, source: str) -> None:
        self.js = js
        self.subjects = subjects
        self.streams = streams
        self.source = source

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        async def subscribe() -> JetStreamContext.PullSubscription:
            # Created if missing, else left as it is: its acknowledgements say what is recorded.
            return await durable_pull(
                self.js,
                self.streams.advisories,
                ConsumerConfig(
                    durable_name=DURABLE_NAME,
                    name=DURABLE_NAME,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    # Never given up on: an advisory not recorded yet is delivered until it is.
                    max_deliver=-1,
                    ack_wait=60.0,
                    max_ack_pending=BATCH * 4,
                ),
                existing="update",
            )

        while True:
            try:
                return await retry_transient(subscribe, what=f"the projector's consumer on {self.streams.advisories}")
            except NotFoundError:
                # An installation provisioned before dead letters were recorded: the audit goes on
                # meanwhile, and the advisories are captured from provisioning on.
                log.error(
                    "no advisories stream: dead letters are not recorded until `warden provision` creates it",
                    stream=self.streams.advisories,
                    retry_in_s=STREAM_MISSING_RETRY_SECONDS,
                )
                await asyncio.sleep(STREAM_MISSING_RETRY_SECONDS)

    async def run(self) -> None:
        """Record advisories until cancelled; raise `GroundLost` if the consumer or stream goes away."""
        subscription = await self._subscribe()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._consume(subscription))
                group.create_task(
                    watch_ground(
                        lambda: self.js.consumer_info(self.streams.advisories, DURABLE_NAME),
                        f"the consumer {DURABLE_NAME} on {self.streams.advisories}",
                    )
                )
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            for message in await fetch_batch(subscription, BATCH, FETCH_WAIT_SECONDS):
                await self.handle(message)

    async def handle(self, message: Msg) -> None:
        """Record one advisory's dead letter, then acknowledge it; on failure, leave it to come back."""
        try:
            given_up = read_advisory(message.data)
        except ValueError as exc:
            # Only the server publishes on the advisory subjects (no identity may): nothing to record
            # it as, and it stays in the advisories stream for whoever looks.
            log.error(
                "an advisory that names no message; passed over",
                advisory_seq=message.metadata.sequence.stream,
                subject=message.subject,
                error=str(exc),
            )
            await message.ack()
            return
        try:
            content, missing = await self._content(given_up)
            event = dead_letter_event(given_up, content, source=self.source, missing=missing)
        except ValueError as exc:
            # Names no event can hold (not one of this installation's streams, say): retrying would
            # stop every advisory behind it, so it is passed over, loudly, and stays in its stream.
            log.error(
                "an advisory no dead letter can record; passed over",
                advisory_seq=message.metadata.sequence.stream,
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
            await message.nak(delay=RETRY_DELAY_SECONDS)
            return
        try:
            await record_dead_letter(self.js, self.subjects, self.streams.events, event)
        except (nats.errors.Error, TimeoutError) as exc:
            log.error(
                "could not record a dead letter; it will be tried again",
                stream=given_up.stream,
                stream_seq=given_up.stream_seq,
                consumer=given_up.consumer,
                retry_in_s=RETRY_DELAY_SECONDS,
                error=repr(exc),
            )
            await message.nak(delay=RETRY_DELAY_SECONDS)
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

    async def _content(self, given_up: GivenUp) -> tuple[Content | None, str | None]:
        """The message as its stream holds it, or None and why not."""
        try:
            stored = await retry_transient(
                lambda: self.js.get_msg(given_up.stream, given_up.stream_seq),
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
