"""The policy gate: every command passes here first; bad ones are rejected on the record."""

from typing import Any

import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage
from faststream.params import NoCast
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.policy_gate.intake import check_command, rejection_tenant
from shared.bus import envelope_headers
from shared.messages import CommandRejected, Envelope, make_envelope
from shared.service import run_service
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects

SERVICE = "policy-gate"
DURABLE_NAME = "policy_gate"
# A command whose outcome cannot be published after this many deliveries is left in the stream
# (the audit trail still has it) rather than retried forever; the server emits a max-deliveries
# advisory for it.
MAX_DELIVERIES = 5
RETRY_DELAY_SECONDS = 1.0
MAX_IN_FLIGHT = 64
PUBLISH_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger(__name__)


def _keep_raw(message: NatsMessage) -> Msg:
    # Intake judges the raw bytes itself, so a non-JSON body must reach the handler undecoded.
    return message.raw_message


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    broker = NatsBroker(settings.nats_url)

    async def publish(envelope: Envelope[Any], idempotency_key: str) -> None:
        await broker.publish(
            envelope.to_bytes(),
            subjects.expected_subject(envelope),
            headers=envelope_headers(envelope, idempotency_key),
            stream=streams.events,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    @broker.subscriber(
        subjects.all_commands,
        # A push consumer shared by every gate instance through the queue group: JetStream
        # spreads commands across them and redelivers what an instance leaves unacknowledged.
        stream=JStream(streams.commands, declare=False),
        # With a queue group and no `durable`, nats-py names the durable consumer after the group.
        queue=DURABLE_NAME,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(max_deliver=MAX_DELIVERIES, ack_wait=30.0, max_ack_pending=MAX_IN_FLIGHT),
        max_workers=MAX_IN_FLIGHT,
        # Manual: ack once the outcome is stored; nak with a delay when publishing it failed.
        ack_policy=AckPolicy.MANUAL,
        decoder=_keep_raw,
    )
    async def on_command(message: NoCast[Msg]) -> None:
        metadata = message.metadata
        outcome = check_command(
            subjects,
            nats_subject=message.subject,
            data=message.data,
            headers=message.headers,
            stream_seq=metadata.sequence.stream,
            max_bytes=settings.max_command_bytes,
        )
        bound = log.bind(subject=message.subject, stream_seq=metadata.sequence.stream)
        try:
            if isinstance(outcome, CommandRejected):
                rejection = make_envelope(
                    outcome,
                    tenant=rejection_tenant(subjects, message.subject),
                    subject=str(metadata.sequence.stream),
                    actor=SERVICE,
                    source=SERVICE,
                )
                # Keyed by the command's position: a redelivered command is rejected once.
                await publish(rejection, f"rejected-{metadata.stream}-{metadata.sequence.stream}")
                bound.warning("command rejected", code=outcome.code, reason=outcome.reason)
            else:
                bound.info("command accepted", type=outcome.type, run_id=outcome.subject, event_id=outcome.id)
        except (NatsError, TimeoutError) as exc:
            if metadata.num_delivered >= MAX_DELIVERIES:
                bound.error("giving up on command after repeated publish failures", error=repr(exc))
                await message.term()
            else:
                bound.warning("could not record outcome; will retry", error=repr(exc))
                await message.nak(delay=RETRY_DELAY_SECONDS * metadata.num_delivered)
            return
        await message.ack()

    return FastStream(broker)


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
