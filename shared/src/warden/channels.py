"""What each service receives and sends, declared as FastStream subscribers and publishers.

Each service builds its `ServiceChannels` (the services' `channels(prefix)`) and includes its
router in the broker it runs on; `make schemas` builds the same four routers on one broker and
writes FastStream's own AsyncAPI document of them to schemas/asyncapi.json. So that document lists
what the services really receive and send, from the declarations their processes run with, and
tests/test_channels.py checks the sending side against what a governed run stores.

Sending: a service stores an envelope through its declared publisher (`ServiceChannels.store`),
which refuses a type the service does not declare, so the document cannot fall behind the code.
Two hot paths send pipelined instead, with nats-py's `publish_async`: the gate's answers and the
scheduler's dispatches. FastStream 0.7.8 has no such form (each publish waits for its
acknowledgement), and `python -m bench.faststream_publishers` (bench/results/faststream_publishers.json,
5,000 acknowledged publishes, three rounds) measured pipelining at 2.35 times the rate of one
nats-py publish at a time and 0.26 of its CPU per message, where FastStream's publisher object runs
at 0.89 of that rate for 1.37 times the CPU.

Receiving is declared, not driven: FastStream subscribes a subscriber only once a handler is
attached, and these have none, because the services consume through `warden.consumers`, whose
docstring has the benchmark figures that say why. FastStream reads a subscriber's message schema
from its handler's signature; for a subscriber without one, schemas/generate.py adds the envelope
schemas of the message types it is declared with here (`ServiceChannels.received`).
"""

import functools
import operator
from typing import Any, Literal

from faststream.nats import JStream, NatsRouter
from faststream.nats.publisher.usecase import LogicPublisher
from nats.js.api import PubAck

from warden.bus import envelope_headers, retry_transient
from warden.messages import ENVELOPE_TYPES, Envelope
from warden.streams import StreamNames
from warden.subjects import CHANNELS, Channel, Subjects

BY_NAME: dict[str, Channel] = {channel.name: channel for channel in CHANNELS}
# How long a publisher waits for the stream's acknowledgement: nats-py's JetStream default, where
# FastStream's publishers would wait 0.5 s and so fail spuriously under load.
PUBLISH_TIMEOUT_SECONDS = 5.0


def envelope_schema(types: tuple[str, ...]) -> Any:
    """The envelope model of each type, as one union FastStream (and pydantic) can describe."""
    unknown = [name for name in types if name not in ENVELOPE_TYPES]
    if unknown:
        raise ValueError(f"no message type is named {unknown}")
    return functools.reduce(operator.or_, (ENVELOPE_TYPES[name] for name in types))


class ServiceChannels:
    """One service's channels: a FastStream router with a subscriber or publisher for each."""

    def __init__(self, service: str, prefix: str) -> None:
        self.service = service
        self.subjects = Subjects(prefix)
        self.streams = StreamNames.for_prefix(prefix)
        self.router = NatsRouter()
        # Each declared subscriber's AsyncAPI title and the message types it receives.
        self.received: dict[str, tuple[str, ...]] = {}
        # Each declared publisher's AsyncAPI title and the message types it sends.
        self.sent: dict[str, tuple[str, ...]] = {}
        # Each channel's publisher and the stream it stores into.
        self.publishers: dict[str, tuple[LogicPublisher, str]] = {}

    @staticmethod
    def everything_on(channel: str) -> tuple[str, ...]:
        """Every message type the subject catalogue says a channel carries."""
        return BY_NAME[channel].message_types

    def address(self, channel: str) -> str:
        return BY_NAME[channel].pattern.replace("{prefix}", self.subjects.prefix)

    def title(self, verb: str, channel: str) -> str:
        return f"{self.service}.{verb}.{channel}"

    def receives(
        self,
        channel: str,
        types: tuple[str, ...],
        *,
        stream: str,
        how: str,
        consumer: Literal["pull", "shared push", "ordered"],
        durable: str | None = None,
        address: str | None = None,
    ) -> None:
        """Declare a subscriber shaped like the consumer the service sets up (a durable pull consumer,
        a push consumer every instance shares through a queue group named as the durable, or an
        ordered consumer), without a handler: the service consumes through `warden.consumers`."""
        title = self.title("receives", channel)
        envelope_schema(types)  # an unknown type fails here, where it is declared
        self.router.subscriber(
            address or self.address(channel),
            stream=JStream(stream, declare=False),
            # A shared push consumer's queue group is named as its durable.
            durable=durable if consumer == "pull" else None,
            queue=(durable or "") if consumer == "shared push" else "",
            pull_sub=consumer == "pull",
            ordered_consumer=consumer == "ordered",
            title=title,
            description=how,
        )
        self.received[title] = types

    def sends(
        self,
        channel: str,
        types: tuple[str, ...],
        *,
        stream: str,
        how: str,
        address: str | None = None,
        schema: Any = None,
    ) -> LogicPublisher:
        """A publisher of envelopes of `types` (or, for what is no envelope, of `schema` at `address`)."""
        title = self.title("sends", channel)
        publisher = self.router.publisher(
            address or self.address(channel),
            stream=JStream(stream, declare=False),
            schema=schema if schema is not None else envelope_schema(types),
            timeout=PUBLISH_TIMEOUT_SECONDS,
            title=title,
            description=how,
        )
        self.sent[title] = types
        self.publishers[channel] = (publisher, stream)
        return publisher

    async def store(self, envelope: Envelope[Any], key: str) -> PubAck:
        """Store one envelope through the publisher declared for its kind (a command or an event),
        passing bus failures waited out: the idempotency key makes a retry safe."""
        channel = "commands" if envelope.data.KIND == "command" else "events"
        title = self.title("sends", channel)
        if envelope.type not in self.sent.get(title, ()):
            raise ValueError(f"{self.service} does not declare that it sends {envelope.type} on {channel}")
        (publisher, stream), subject = self.publishers[channel], self.subjects.expected_subject(envelope)
        body, headers = envelope.to_bytes(), envelope_headers(envelope, key)
        return await retry_transient(
            lambda: publisher.publish(
                body, subject=subject, headers=headers, correlation_id=envelope.correlation_id, stream=stream
            ),
            what=envelope.type,
        )
