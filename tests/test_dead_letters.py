"""Dead letters: a message any consumer gives up on is recorded, with its bytes, and `warden dead-letters` lists it.

Against the real nats-server, whose max-deliveries and terminated advisories the installation's
advisories stream captures, and the real Postgres the projector writes.
"""

import asyncio
import base64
import json
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from structlog.testing import capture_logs

from tests.conftest import AppRunner, Servers, eventually, warden_cli
from warden.agent_runner.app import build_app as build_runner
from warden.audit_projector import advisories
from warden.audit_projector.advisories import MAX_DELIVERIES_TYPE, TERMINATED_TYPE, read_advisory
from warden.audit_projector.app import build_app as build_projector
from warden.audit_projector.install import install_database
from warden.audit_projector.replay import replay
from warden.bus import envelope_headers
from warden.dead_letters import Content, GivenUp, dead_letter_event, dead_letter_key
from warden.messages import MAX_DEAD_LETTER_RAW_BYTES, MessageDeadLettered, RunSubmitted, make_envelope
from warden.policy_gate.app import MAX_DELIVERIES
from warden.policy_gate.app import build_app as build_gate
from warden.settings import Settings
from warden.streams import STREAM_MAX_MSG_BYTES, StreamNames, provision
from warden.subjects import Subjects

DEAD_LETTER_ROW = (
    "SELECT stream, stream_seq, consumer, reason, deliveries, recorded_at, subject, raw, raw_note, event_id "
    "FROM dead_letters ORDER BY stream, stream_seq, consumer"
)


async def dead_letter_events(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM events WHERE type = $1", MessageDeadLettered.TYPE)
    return count


async def consumer_exists(js: JetStreamContext, stream: str, name: str) -> bool:
    try:
        await js.consumer_info(stream, name)
    except NotFoundError:
        return False
    return True


async def give_up_by_max_deliveries(nc: NatsClient, settings: Settings, body: bytes) -> tuple[int, str]:
    """Store `body` as a command, and have a consumer allowing two deliveries nak it twice; its sequence and subject."""
    subjects, streams = Subjects(settings.subject_prefix), StreamNames.for_prefix(settings.subject_prefix)
    js = nc.jetstream()
    subject = subjects.command("acme", RunSubmitted.TYPE, "alice")
    seq = (await js.publish(subject, body)).seq
    flaky = await js.pull_subscribe(
        subject,
        durable="flaky",
        stream=streams.commands,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=2, ack_wait=30),
    )
    for _ in range(2):
        (message,) = await flaky.fetch(1, timeout=5)
        await message.nak()
    # The server gives up when it would deliver the message a third time: on the next pull.
    with pytest.raises(TimeoutError):
        await flaky.fetch(1, timeout=1)
    await flaky.unsubscribe()
    return seq, subject


async def test_a_message_delivered_as_often_as_its_consumer_allows_is_a_dead_letter_with_its_bytes(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """The server's max-deliveries advisory becomes a dead letter: stream, sequence, consumer, reason, the raw
    bytes; an event in the audit trail, so a replay rebuilds the same row."""
    await run_app(build_projector(settings))
    body = b'{"not": "an envelope"}'
    seq, subject = await give_up_by_max_deliveries(nc, settings, body)

    row = await eventually(lambda: db.fetchrow(DEAD_LETTER_ROW))
    commands = StreamNames.for_prefix(settings.subject_prefix).commands
    assert (row["stream"], row["stream_seq"], row["consumer"], row["deliveries"]) == (commands, seq, "flaky", 2)
    assert row["reason"] == "max deliveries reached: delivered 2 times and never acknowledged"
    assert (row["raw"], row["subject"], row["raw_note"]) == (body, subject, None)
    assert row["recorded_at"] is not None
    event = await db.fetchrow("SELECT tenant, entity_id, source FROM events WHERE event_id = $1", row["event_id"])
    assert event is not None
    assert dict(event) == {"tenant": "_warden", "entity_id": commands, "source": "audit-projector"}

    report = await replay(settings, "rebuilt")
    assert report.gaps == ()
    assert await db.fetch(DEAD_LETTER_ROW.replace("dead_letters", "rebuilt.dead_letters")) == [row]


async def test_a_command_whose_answer_cannot_be_stored_is_a_dead_letter_once_it_can(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """The gate terminates a command after five deliveries whose answer the events stream refused, saying why;
    the dead letter waits (the advisory kept) until the events stream takes it, then carries the command's bytes."""
    js = nc.jetstream()
    streams = StreamNames.for_prefix(settings.subject_prefix)
    await run_app(build_projector(settings))
    await run_app(build_gate(settings))
    # The gate records its bundle (policy.activated) before it decides anything; only then is the stream shrunk.
    await eventually(lambda: db.fetchval("SELECT count(*) FROM events WHERE type = 'policy.activated'"))
    events = (await js.stream_info(streams.events)).config
    await js.update_stream(replace(events, max_msg_size=64))  # every answer, and every dead letter, is refused
    body = b"not json at all"
    subject = Subjects(settings.subject_prefix).command("acme", RunSubmitted.TYPE, "alice")
    seq = (await js.publish(subject, body)).seq

    async def advised() -> bool:
        return (await js.stream_info(streams.advisories)).state.messages >= 1

    await eventually(advised, within=40)  # naks after 1, 2, 3 and 4 s, then the fifth delivery is terminated
    await asyncio.sleep(1)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0, "not stored anywhere yet: not lost either"
    await js.update_stream(replace(events, max_msg_size=STREAM_MAX_MSG_BYTES))

    row = await eventually(lambda: db.fetchrow(DEAD_LETTER_ROW), within=20)
    assert (row["stream"], row["stream_seq"], row["consumer"]) == (streams.commands, seq, "policy_gate")
    assert row["deliveries"] == MAX_DELIVERIES
    assert row["reason"].startswith(
        f"terminated by the consumer: its answer could not be stored in {MAX_DELIVERIES} deliveries: BadRequestError"
    )
    assert (row["raw"], row["subject"]) == (body, subject)


async def test_an_invalid_work_item_is_recorded_with_its_bytes_before_it_leaves_the_work_queue(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """The runner records the item it terminates, bytes and all; the server's advisory about the same item,
    which comes after the item is gone, adds no second record."""
    subjects, streams = Subjects(settings.subject_prefix), StreamNames.for_prefix(settings.subject_prefix)
    js = nc.jetstream()
    await run_app(build_projector(settings))
    await run_app(build_runner(settings))
    body = b'{"type": "run.exploded"}'
    seq = (await js.publish(subjects.work("acme"), body)).seq

    row = await eventually(lambda: db.fetchrow(DEAD_LETTER_ROW))
    assert (row["stream"], row["stream_seq"], row["consumer"], row["deliveries"]) == (
        streams.work,
        seq,
        "agent_runner",
        1,
    )
    assert row["reason"] == (
        "terminated by the consumer: invalid work item: unknown_type: unknown message type 'run.exploded'"
    )
    assert (row["raw"], row["subject"]) == (body, subjects.work("acme"))
    assert (await js.stream_info(streams.work)).state.messages == 0, "terminated: gone from the work queue"

    async def advisory_handled() -> bool:
        info = await js.consumer_info(streams.advisories, "audit_projector")
        return bool(info.delivered.stream_seq >= 1 and info.num_ack_pending == 0)

    await eventually(advisory_handled)
    await asyncio.sleep(0.5)
    assert await dead_letter_events(db) == 1, "the advisory's record was the runner's, stored once"
    assert len(await db.fetch(DEAD_LETTER_ROW)) == 1


async def test_redelivered_advisories_and_repeated_records_add_no_dead_letter(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A projector that starts its advisories over records each again under the same key (stored once); the
    same dead letter recorded past the duplicate window is a second event but still one row."""
    js = nc.jetstream()
    streams = StreamNames.for_prefix(settings.subject_prefix)
    first = build_projector(settings)
    running = asyncio.create_task(first.run())
    await give_up_by_max_deliveries(nc, settings, b"twice")
    await eventually(lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letters"))
    first.exit()
    await asyncio.wait_for(running, 10)

    # Every advisory delivered again, from the start.
    await js.delete_consumer(streams.advisories, "audit_projector")
    await run_app(build_projector(settings))

    async def redelivered() -> bool:
        info = await js.consumer_info(streams.advisories, "audit_projector")
        return bool(info.delivered.stream_seq >= 1 and info.num_ack_pending == 0)

    await eventually(redelivered)
    await asyncio.sleep(0.5)
    assert (await dead_letter_events(db), len(await db.fetch(DEAD_LETTER_ROW))) == (1, 1)

    # The same dead letter recorded again once the duplicate window has passed: another key.
    (stored,) = await db.fetch("SELECT payload FROM events WHERE type = $1", MessageDeadLettered.TYPE)
    data = MessageDeadLettered.model_validate_json(stored["payload"])
    again = make_envelope(data, tenant="_warden", entity_id=data.stream, actor="audit-projector", source="test")
    key = "past-the-window"
    assert key != dead_letter_key(data.stream, data.stream_seq, data.consumer)
    subject = Subjects(settings.subject_prefix).expected_subject(again)
    await js.publish(subject, again.to_bytes(), headers=envelope_headers(again, key))
    await eventually(lambda: db.fetchval("SELECT count(*) = 2 FROM events WHERE type = $1", MessageDeadLettered.TYPE))
    assert len(await db.fetch(DEAD_LETTER_ROW)) == 1


async def test_without_an_advisories_stream_the_projector_projects_and_records_dead_letters_once_provisioned(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installation provisioned before dead letters were recorded: the projector says so, projects as
    before, and starts recording dead letters once `warden provision` has created the advisories stream."""
    monkeypatch.setattr(advisories, "STREAM_MISSING_RETRY_SECONDS", 0.5)
    js = nc.jetstream()
    streams = StreamNames.for_prefix(settings.subject_prefix)
    await js.delete_stream(streams.advisories)
    with capture_logs() as logs:
        await run_app(build_projector(settings))
    assert any(line["event"].startswith("no advisories stream") for line in logs)

    seq, _ = await give_up_by_max_deliveries(nc, settings, b"before")
    position = "SELECT last_seq FROM projector_positions WHERE stream = $1"
    await eventually(lambda: db.fetchval(position + " AND last_seq >= $2", streams.commands, seq))
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0, "not captured: there was no stream"

    await provision(js, Subjects(settings.subject_prefix))
    await eventually(lambda: consumer_exists(js, streams.advisories, "audit_projector"))
    seq, _ = await give_up_by_max_deliveries(nc, settings, b"after")
    row = await eventually(lambda: db.fetchrow(DEAD_LETTER_ROW))
    assert (row["stream"], row["stream_seq"], row["raw"]) == (streams.commands, seq, b"after")


async def test_warden_dead_letters_lists_them(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """`warden dead-letters` prints each with its reason and bytes (escaped), `--json` gives the bytes in base64,
    and `--stream` keeps one stream's."""
    await run_app(build_projector(settings))
    body = b'{"q": "\x1b[31mred"}'
    seq, subject = await give_up_by_max_deliveries(nc, settings, body)
    await eventually(lambda: db.fetchval("SELECT count(*) = 1 FROM dead_letters"))
    commands = StreamNames.for_prefix(settings.subject_prefix).commands

    text = await warden_cli(settings, "dead-letters")
    assert f"{commands} " in text
    assert f" {seq} flaky " in text
    assert "max deliveries reached: delivered 2 times" in text
    assert f"{subject}: {len(body)} bytes" in text
    assert "\x1b" not in text, "a sender's bytes never reach the terminal unescaped"

    (line,) = (await warden_cli(settings, "dead-letters", "--json")).splitlines()
    record = json.loads(line)
    assert (record["stream"], record["stream_seq"], record["consumer"]) == (commands, seq, "flaky")
    assert base64.b64decode(record["raw_base64"]) == body
    assert await warden_cli(settings, "dead-letters", "--stream", "commands", "--json") == line + "\n"
    assert await warden_cli(settings, "dead-letters", "--stream", "work") == "no dead letters\n"


async def test_a_dead_letters_table_from_before_consumers_were_named_is_migrated_in_place(
    servers: Servers, settings: Settings, db: asyncpg.Connection
) -> None:
    """The projector's own dead letters of an older table are kept, as the `audit_projector` consumer's, and the
    table takes one dead letter per message and consumer."""
    await db.execute("DROP TABLE dead_letters")
    await db.execute(
        "CREATE TABLE dead_letters (stream text NOT NULL, stream_seq bigint NOT NULL, reason text NOT NULL, "
        "PRIMARY KEY (stream, stream_seq))"
    )
    await db.execute("INSERT INTO dead_letters VALUES ('S', 7, 'refused even raw')")
    assert settings.nats_credentials_dir is not None
    for _ in range(2):  # `warden up` installs on every start
        await install_database(
            servers.database_url, settings.database_url, settings.nats_credentials_dir, settings.subject_prefix
        )
    row = await db.fetchrow("SELECT stream, stream_seq, consumer, reason, raw FROM dead_letters")
    assert row is not None
    assert dict(row) == {
        "stream": "S",
        "stream_seq": 7,
        "consumer": "audit_projector",
        "reason": "refused even raw",
        "raw": None,
    }
    await db.execute("INSERT INTO dead_letters (stream, stream_seq, consumer, reason) VALUES ('S', 7, 'gate', 'x')")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute("INSERT INTO dead_letters (stream, stream_seq, consumer, reason) VALUES ('S', 7, 'gate', 'y')")
    with pytest.raises(asyncpg.NotNullViolationError):
        await db.execute("INSERT INTO dead_letters (stream, stream_seq, reason) VALUES ('S', 8, 'no consumer')")


def test_advisories_are_read_for_what_was_given_up_and_why() -> None:
    """Both advisory kinds name the message, the consumer and the reason; any other document is refused."""
    common = '"timestamp": "2026-01-02T03:04:05.5Z", "stream": "W_COMMANDS", "consumer": "gate", "stream_seq": 7'
    exceeded = read_advisory(f'{{"type": "{MAX_DELIVERIES_TYPE}", {common}, "deliveries": 5}}'.encode())
    assert (exceeded.stream, exceeded.stream_seq, exceeded.consumer, exceeded.deliveries) == (
        "W_COMMANDS",
        7,
        "gate",
        5,
    )
    assert exceeded.reason == "max deliveries reached: delivered 5 times and never acknowledged"
    terminated = read_advisory(f'{{"type": "{TERMINATED_TYPE}", {common}, "deliveries": 1, "reason": "bad"}}'.encode())
    assert terminated.reason == "terminated by the consumer: bad"
    for other in (b"[]", b"not json", f'{{"type": "io.nats.jetstream.advisory.v1.nak", {common}}}'.encode()):
        with pytest.raises(ValueError, match="advisory"):
            read_advisory(other)


def test_a_dead_letter_carries_the_bytes_up_to_its_ceiling_and_names_larger_ones() -> None:
    """Bytes up to MAX_DEAD_LETTER_RAW_BYTES travel in the event; a larger message is pointed at in its stream."""
    given_up = GivenUp("W_COMMANDS", 7, "gate\x00", "why", 5, datetime.now(UTC))
    small = dead_letter_event(given_up, Content("w.cmd.acme", b"\x00\xff"), source="test").data
    assert (small.raw, small.raw_note, small.consumer) == (base64.b64encode(b"\x00\xff").decode(), None, "gate\\u0000")
    large = Content("w.cmd.acme", b"x" * (MAX_DEAD_LETTER_RAW_BYTES + 1))
    named = dead_letter_event(given_up, large, source="test")
    assert named.data.raw is None
    assert named.data.raw_note is not None
    assert "see W_COMMANDS at sequence 7" in named.data.raw_note
    assert len(named.to_bytes()) < STREAM_MAX_MSG_BYTES
    largest = dead_letter_event(given_up, Content("s", b"x" * MAX_DEAD_LETTER_RAW_BYTES), source="test")
    assert len(largest.to_bytes()) < STREAM_MAX_MSG_BYTES, "the largest copy still fits a stream's message"
