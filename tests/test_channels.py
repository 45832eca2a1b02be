"""The services' declared channels (warden.channels) cover every message type and say what the services really send."""

from collections import defaultdict

import asyncpg
import nats.js.errors
import pytest
from faststream.nats import JStream, NatsBroker, NatsMessage, TestNatsBroker
from nats.aio.client import Client as NatsClient

from schemas.generate import SERVICE_CHANNELS
from tests.conftest import AppRunner, eventually
from tests.test_governed_run import run_row, start_all
from warden.agent_runner.execution import SERVICE
from warden.channels import ServiceChannels
from warden.client import WardenClient
from warden.errors import InvalidMessage
from warden.messages import MESSAGE_TYPES, RunQueued, RunStarted, make_envelope, parse_envelope
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import CHANNELS
from warden.wire import MSG_ID_HEADER, TYPE_HEADER

PREFIX = "warden"


def declared() -> dict[str, ServiceChannels]:
    return {channels.service: channels for channels in (make(PREFIX) for make in SERVICE_CHANNELS)}


def sent_by(channel: str) -> dict[str, set[str]]:
    """Each service's declared message types on one channel."""
    return {name: set(service.sent.get(service.title("sends", channel), ())) for name, service in declared().items()}


def test_every_event_type_has_a_sender_and_every_message_a_receiver() -> None:
    services = declared()
    sent = {t for service in services.values() for types in service.sent.values() for t in types}
    events = {name for name, model in MESSAGE_TYPES.items() if model.KIND == "event"}
    commands = set(MESSAGE_TYPES) - events
    assert events <= sent, f"events no service declares it sends: {sorted(events - sent)}"
    gate = services["policy-gate"].received[services["policy-gate"].title("receives", "commands")]
    assert set(gate) == commands
    projector = services["audit-projector"]
    audited = set(projector.received[projector.title("receives", "commands")])
    audited |= set(projector.received[projector.title("receives", "events")])
    assert audited == set(MESSAGE_TYPES), "the projector records every message type"


async def test_what_the_services_store_is_what_they_declare_they_send(
    settings: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
) -> None:
    """A run allowed (with a tool call allowed and one denied), a run denied, and a malformed command:
    every message a service stored is of a type it declares for that channel, and all four stored some."""
    await start_all(run_app, settings)
    client = WardenClient(nc, settings.subject_prefix)
    allowed = await client.submit_run(tenant="acme", agent="demo", actor="alice", input={"question": "why?"})
    denied = await client.submit_run(tenant="acme", agent="demo", actor="bob")
    js = nc.jetstream()
    streams = StreamNames.for_prefix(settings.subject_prefix)
    await js.publish(f"{settings.subject_prefix}.cmd.acme.alice.run.submitted", b"{not json", stream=streams.commands)
    await eventually(await run_row(db, allowed.run_id, ("succeeded",)), within=30)
    await eventually(await run_row(db, denied.run_id, ("denied",)), within=30)
    await eventually(lambda: db.fetchval("SELECT count(*) > 0 FROM rejected_commands"), within=30)

    stored: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # channel -> source -> types
    for channel, stream in (("commands", streams.commands), ("events", streams.events)):
        info = await js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                message = await js.get_msg(stream, seq)
                envelope = parse_envelope(message.data or b"")
            except (nats.js.errors.NotFoundError, InvalidMessage):
                continue  # a deleted message, or the malformed command (no service sent it)
            stored[channel][envelope.source].add(envelope.type)

    senders = {"policy-gate", "scheduler", "agent-runner"}
    assert senders <= set(stored["events"]), dict(stored["events"])
    assert "agent-runner" in stored["commands"]
    for channel, by_source in stored.items():
        declared_types = sent_by(channel)
        for source, types in by_source.items():
            if source not in declared_types:
                continue  # a client's command: clients are not services and declare nothing
            assert types <= declared_types[source], f"{source} sent {sorted(types - declared_types[source])}"
    # The projector's own sending (gaps, dead letters, checkpoints) is checked where it happens:
    # tests/test_dead_letters.py and tests/test_audit_chain.py.


async def test_a_service_stores_through_its_declared_publisher() -> None:
    """In memory (FastStream's TestNatsBroker): `store` sends the envelope on its expected subject, with
    its dedup key, type and correlation id, and refuses a type its service does not declare."""
    runner = declared_by("agent-runner")
    broker = NatsBroker()
    broker.include_router(runner.router)
    received: list[NatsMessage] = []

    @broker.subscriber(f"{PREFIX}.evt.>", stream=JStream(runner.streams.events, declare=False))
    async def record(message: NatsMessage) -> None:
        received.append(message)

    started = make_envelope(
        RunStarted(decision_id="d1", worker="w1"), tenant="acme", entity_id="r1", actor=SERVICE, source=SERVICE
    )
    queued = make_envelope(
        RunQueued(decision_id="d1", priority=1, agent="demo", request_seq=1),
        tenant="acme",
        entity_id="r1",
        actor="x",
        source="x",
    )
    async with TestNatsBroker(broker):
        await runner.store(started, "r1-started")
        with pytest.raises(ValueError, match=r"does not declare that it sends run\.queued"):
            await runner.store(queued, "k")
    [message] = received
    assert message.raw_message.subject == runner.subjects.expected_subject(started)
    assert parse_envelope(message.body) == started
    assert message.headers[MSG_ID_HEADER] == "r1-started"
    assert message.headers[TYPE_HEADER] == RunStarted.TYPE
    assert message.correlation_id == started.correlation_id


def declared_by(service: str) -> ServiceChannels:
    return declared()[service]


def test_the_subject_catalogue_names_the_services_that_declare_each_channel() -> None:
    """The README's subject table (from CHANNELS) says who publishes and consumes each channel: every
    service that declares it sends or receives on a channel is named there, and no other service is."""
    for channel in CHANNELS:
        for verb, named in (("sends", channel.published_by), ("receives", channel.consumed_by)):
            declaring = {
                name.replace("-", " ")
                for name, service in declared().items()
                if service.title(verb, channel.name) in (service.sent if verb == "sends" else service.received)
            }
            services = {name.replace("-", " ") for name in declared()}
            mentioned = {name for name in services if name in named}
            assert mentioned == declaring, f"{channel.name} ({verb}): the catalogue says {named!r}"
