"""The fast replay path gives the live projector's rows: bare reader, COPY, merged read models, workers.

`test_projector.py` compares a replay with the live tables for plain runs; these tests add every
message kind and every way a message can go wrong, replay them through worker processes with
segments of a few messages (so read-model merges cross segments and processes), and check the
pieces the fast path replaces: header parsing (nats-py's parser) and timestamp encoding (asyncpg's).
"""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from tests.conftest import AppRunner, Servers, eventually
from tests.test_projector import TABLES, stream_total, table_rows
from warden.admission import CommandRules
from warden.audit_projector.app import build_app
from warden.audit_projector.copy_codec import connect_for_copy
from warden.audit_projector.projection import StoredMessage
from warden.audit_projector.replay import replay
from warden.audit_projector.store import AuditStore, create_pool
from warden.audit_projector.stream_reader import parse_headers, read_range, stored_message
from warden.bus import envelope_headers
from warden.database import DatabaseRole
from warden.identity import nkey_connect_fields
from warden.messages import (
    CommandRejected,
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def envelope_of(data: Payload, tenant: str, run_id: str, caused_by: Envelope[Any] | None = None) -> Envelope[Any]:
    return make_envelope(data, tenant=tenant, entity_id=run_id, actor="svc", source="test", caused_by=caused_by)


def stored(envelope: Envelope[Any], **changes: Any) -> bytes:
    """The envelope's bytes, with top-level or `data.` fields changed (bypassing validation)."""
    document = json.loads(envelope.to_bytes())
    for key, value in changes.items():
        if key.startswith("data."):
            document["data"][key.removeprefix("data.")] = value
        else:
            document[key] = value
    return json.dumps(document).encode()


async def publish_everything(nc: NatsClient, subjects: Subjects) -> None:
    """Every message kind, in both streams, with every way a message can be refused."""
    js = nc.jetstream()

    async def send(envelope: Envelope[Any], body: bytes | None = None, subject: str | None = None) -> None:
        headers = {**envelope_headers(envelope), "traceparent": TRACEPARENT}
        await js.publish(subject or subjects.expected_subject(envelope), body or envelope.to_bytes(), headers=headers)

    # A whole governed run: every message type, tool call completed before it was requested.
    submitted = envelope_of(RunSubmitted(agent="demo", input={"q": "é", "n": 2**53 - 1}), "acme", "r1")
    await send(submitted)
    decided = DecisionMade(
        decision_id="d1",
        request_type=RunSubmitted.TYPE,
        request_id=submitted.id,
        request_seq=1,
        effect="allow",
        reasons=["ok"],
        policy_revision="p1",
        evaluation_ms=0.5,
    )
    for payload in (
        decided,
        RunQueued(decision_id="d1", priority=5, agent="demo", request_seq=1),
        RunDispatched(decision_id="d1", agent="demo", request_seq=1),
        RunStarted(decision_id="d1", worker="w1"),
        StepCompleted(step=0, kind="model_turn"),
        ToolCallCompleted(tool_call_id="tc2", step=1, tool="web.fetch", decision_id=None, outcome="refused"),
        StepCompleted(step=1, kind="tool_call"),
    ):
        await send(envelope_of(payload, "acme", "r1", submitted))
    for call in ("tc1", "tc2"):
        requested = ToolCallRequested(tool_call_id=call, step=1, agent="demo", tool="web.fetch", arguments={"u": 1.5})
        await send(envelope_of(requested, "acme", "r1", submitted))
    tool_decision = DecisionMade(
        decision_id="d2",
        request_type=ToolCallRequested.TYPE,
        request_id="x",
        request_seq=3,
        effect="allow",
        policy_revision="p1",
        evaluation_ms=0.1,
        tool_call_id="tc1",
    )
    await send(envelope_of(tool_decision, "acme", "r1", submitted))
    completed = ToolCallCompleted(
        tool_call_id="tc1", step=1, tool="web.fetch", decision_id="d2", outcome="ok", result={"a": [1, None]}
    )
    await send(envelope_of(completed, "acme", "r1", submitted))
    await send(envelope_of(RunSucceeded(output={"answer": 42}, steps=2, tool_calls=1), "acme", "r1", submitted))

    # A denied run that also fails (two final statuses of one rank: the first stays).
    denied_run = envelope_of(RunSubmitted(agent="demo"), "globex", "r2")
    await send(denied_run)
    denial = decided.model_copy(update={"decision_id": "d3", "effect": "deny", "request_id": denied_run.id})
    await send(envelope_of(denial, "globex", "r2", denied_run))
    await send(envelope_of(RunFailed(reason="denied", error_type="PolicyDenied"), "globex", "r2", denied_run))

    # Bad input: not JSON, not an envelope, unknown type, wrong subject, a NUL character,
    # no headers at all, headers nats-py has to parse itself, a naive timestamp.
    command_subject = subjects.command("acme", RunSubmitted.TYPE)
    await js.publish(command_subject, b"\xff not json", headers={"Nats-Msg-Id": "garbage-1"})
    await js.publish(command_subject, b"{}")
    await js.publish(command_subject, stored(submitted, type="run.unknown", id="u1"))
    await send(
        envelope_of(RunSubmitted(agent="demo"), "acme", "r3"), subject=subjects.command("globex", "run.submitted")
    )
    nul = envelope_of(RunFailed(reason="a\x00b", error_type="E"), "acme", "r1", submitted)
    await send(nul)
    await js.publish(command_subject, envelope_of(RunSubmitted(agent="demo"), "acme", "r4").to_bytes())
    odd = envelope_of(RunSubmitted(agent="demo"), "acme", "r5")
    await js.publish(command_subject, odd.to_bytes(), headers={"Nats-Msg-Id": "k-é", " traceparent": TRACEPARENT})
    naive = envelope_of(StepCompleted(step=2, kind="model_turn"), "acme", "r1", submitted)
    await send(naive, stored(naive, time="2026-01-02T03:04:05"))
    rejected = CommandRejected(
        code="not_json", reason="body is not JSON", command_subject=command_subject, command_stream_seq=5, size_bytes=9
    )
    await send(make_envelope(rejected, tenant="acme", entity_id="5", actor="gate", source="test"))

    # Envelopes that break the decoding rules: an integer past 2**53 (once alone, once behind an
    # accepted decision with the same id), a lone surrogate, a command over the size limit, a
    # command whose idempotency key claims another tenant's scope.
    too_big = tool_decision.model_copy(update={"decision_id": "d4", "request_seq": 2**63})
    await send(envelope_of(too_big, "acme", "r1", submitted))
    await send(envelope_of(tool_decision.model_copy(update={"decision_id": "d5"}), "acme", "r1", submitted))
    await send(envelope_of(too_big.model_copy(update={"decision_id": "d5"}), "acme", "r1", submitted))
    overflow = envelope_of(RunSucceeded(output=1, steps=0, tool_calls=0), "acme", "r8")
    await send(overflow, stored(overflow, **{"data.output": [1, 2**60]}))
    surrogate = envelope_of(RunFailed(reason="x", error_type="E"), "acme", "r1", submitted)
    await send(surrogate, stored(surrogate, **{"data.reason": "\ud800"}))
    huge = envelope_of(RunSubmitted(agent="demo", input={"blob": "x" * 70_000}), "acme", "r6")
    await send(huge)
    squatter = envelope_of(RunSubmitted(agent="demo"), "globex", "r7")
    await js.publish(
        subjects.expected_subject(squatter), squatter.to_bytes(), headers={"Nats-Msg-Id": "acme:run.submitted:k"}
    )


async def apply_one_by_one(settings: Settings, nc: NatsClient, schema: str) -> None:
    """The live projector's store, one message per batch: the SQL merges, with nothing merged in memory."""
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    pool = await create_pool(settings.database_url_for(DatabaseRole.OWNER), schema=schema, size=1)
    await pool.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    store = AuditStore(pool, CommandRules(subjects, settings.max_command_bytes))
    await store.ensure_schema(list(streams.audited))
    for stream in streams.audited:
        subscription = await nc.jetstream().pull_subscribe(
            "", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        total = (await nc.jetstream().stream_info(stream)).state.messages
        messages: list[StoredMessage] = []
        while len(messages) < total:
            messages += [stored_message(m) for m in await subscription.fetch(total - len(messages), timeout=5)]
        for message in messages:
            await store.apply(stream, [message])
        await subscription.unsubscribe()
    await pool.close()


async def test_fast_replay_equals_live_and_one_by_one(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Worker processes, in-process segments, the live projector and one-message batches: the same rows."""
    await publish_everything(nc, Subjects(settings.subject_prefix))
    await run_app(build_app(settings))
    total = await stream_total(nc, settings)
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total))

    parallel = await replay(settings, "parallel", workers=2, segment_size=4)
    assert parallel.events_applied == total
    sequential = await replay(settings, "sequential", workers=0, segment_size=1)
    assert sequential.events_applied == total
    await apply_one_by_one(settings, nc, "one_by_one")

    # Every row is chained, and the chains come out the same however the rows were written.
    assert await db.fetchval("SELECT count(*) FROM events WHERE chain_index IS NULL OR chain_hash IS NULL") == 0
    for table in TABLES:
        live = await table_rows(db, "public", table)
        for schema in ("parallel", "sequential", "one_by_one"):
            assert await table_rows(db, schema, table) == live, f"{schema}.{table} differs from the live table"
    reasons = {row["invalid_reason"] for row in await db.fetch("SELECT invalid_reason FROM events")}
    codes = ("not_json", "invalid_string", "number_out_of_range", "too_large", "idempotency_key_out_of_scope")
    for code in (*codes, "schema_invalid"):
        assert any(reason and reason.startswith(code) for reason in reasons), code
    assert await db.fetchval("SELECT count(*) FROM runs WHERE run_id IN ('r6', 'r7')") == 0, "rejected: no run rows"
    assert await db.fetchval("SELECT count(*) FROM events WHERE idempotency_key IS NULL") >= 1
    assert await db.fetchval("SELECT count(*) FROM decisions WHERE decision_id = 'd5'") == 1
    tool_call = await db.fetchrow("SELECT outcome, arguments FROM tool_calls WHERE tool_call_id = 'tc2'")
    assert tool_call is not None
    assert (tool_call["outcome"], tool_call["arguments"]) == ("refused", '{"u": 1.5}')


async def test_bare_reader_reads_what_nats_py_reads(settings: Settings, nc: NatsClient, servers: Servers) -> None:
    """Subject, sequence, stored time, headers and bytes: the bare reader's messages equal nats-py's."""
    await publish_everything(nc, Subjects(settings.subject_prefix))
    subjects, streams = Subjects(settings.subject_prefix), StreamNames.for_prefix(settings.subject_prefix)
    for stream, subject in ((streams.commands, subjects.all_commands), (streams.events, subjects.all_events)):
        last = (await nc.jetstream().stream_info(stream)).state.last_seq
        bare = [
            m
            async for batch in read_range(nc, stream, subject, 2, last, seed_file=servers.superuser_seed)
            for m in batch
        ]
        portable = [m async for batch in read_range(nc, stream, subject, 2, last, bare=False) for m in batch]
        assert [m.seq for m in bare] == list(range(2, last + 1))

        def plain(message: StoredMessage) -> tuple[Any, ...]:
            return message._replace(headers=dict(message.headers) if message.headers is not None else None)

        assert [plain(m) for m in bare] == [plain(m) for m in portable]


BLOCKS = [
    b"NATS/1.0\r\nNats-Msg-Id: abc\r\ntraceparent: " + TRACEPARENT.encode() + b"\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: first\r\nNats-Msg-Id: second\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id:   spaced   \r\nEmpty:\r\n\r\n",
    b"NATS/1.0\r\n Nats-Msg-Id : padded name\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: caf\xc3\xa9\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id: \xff\xfe\r\n\r\n",
    b"NATS/1.0\r\nNats-Msg-Id:\tx\t\r\nWeird Name: y\r\nno colon\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
]


async def delivered_headers(nc: NatsClient, block: bytes, seed_file: Path | None) -> dict[str, str] | None:
    """The headers nats-py delivers for a message published with exactly this header block."""
    subject = f"headers.{uuid.uuid4().hex}"
    received: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        received.put_nowait(message)

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    url = nc.connected_url
    assert url is not None
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    info = json.loads((await reader.readline())[5:])
    options: dict[str, Any] = {"headers": True, "verbose": False, "pedantic": False}
    if seed_file is not None:  # authenticate as nats-py does: sign the server's nonce
        options.update(nkey_connect_fields(seed_file, info["nonce"]))
    frame = b"HPUB %s %d %d\r\n%s\r\n" % (subject.encode(), len(block), len(block), block)
    writer.write(b"CONNECT %s\r\n" % json.dumps(options).encode() + frame + b"PING\r\n")
    assert await reader.readline() == b"PONG\r\n"
    writer.close()
    message = await asyncio.wait_for(received.get(), 5)
    return dict(message.headers) if message.headers else None


@pytest.mark.parametrize("block", BLOCKS)
async def test_headers_are_read_as_nats_py_reads_them(nc: NatsClient, block: bytes, servers: Servers) -> None:
    """Every header block, plain or odd, reads as nats-py delivers it from a real server."""
    expected = await delivered_headers(nc, block, servers.superuser_seed)
    headers = parse_headers(block)
    assert (dict(headers) if headers is not None else None) == expected
    for name in ("Nats-Msg-Id", "traceparent", "Empty", "missing"):
        assert (headers or {}).get(name) == (expected or {}).get(name)


async def test_timestamps_are_copied_as_asyncpg_copies_them(settings: Settings) -> None:
    values = [
        datetime.now(UTC),
        datetime(2026, 1, 2, 3, 4, 5),
        datetime(2000, 1, 1, tzinfo=timezone(timedelta(hours=5))),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime.max,
        datetime.min,
        datetime.max.replace(tzinfo=UTC),
        datetime.min.replace(tzinfo=UTC),
    ]
    # What validation makes of an envelope's time: a datetime with pydantic's own TzInfo.
    values.append(parse_envelope(envelope_of(RunStarted(decision_id="d", worker="w"), "acme", "r1").to_bytes()).time)
    texts = []
    owner = settings.database_url_for(DatabaseRole.OWNER)
    for connection in (await asyncpg.connect(owner), await connect_for_copy(owner)):
        await connection.execute("CREATE TEMP TABLE stamps (i int, at timestamptz)")
        await connection.copy_records_to_table("stamps", records=list(enumerate(values)))
        texts.append([row[0] for row in await connection.fetch("SELECT at::text FROM stamps ORDER BY i")])
        await connection.close()
    assert texts[0] == texts[1]


async def test_large_messages_are_read_within_a_bounded_window(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A hundred 900 KB commands and as many 900 KB events among small ones: the live projector and both
    replay readers take them all, with no slow-consumer error however slowly messages are projected."""
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    js = nc.jetstream()
    for i in range(100):
        big = envelope_of(RunSubmitted(agent="demo", input={"blob": "x" * 900_000}), "acme", f"big-{i}")
        small = envelope_of(RunSubmitted(agent="demo"), "acme", f"small-{i}")
        output = envelope_of(RunSucceeded(output=["y" * 900_000], steps=1, tool_calls=0), "acme", f"small-{i}", small)
        for envelope in (big, small, output):
            await js.publish(
                subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope)
            )
    await run_app(build_app(settings))
    total = await stream_total(nc, settings)
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total), within=60)
    assert await db.fetchval("SELECT count(*) FROM events WHERE invalid_reason LIKE 'too_large%'") == 100
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'succeeded'") == 100

    report = await replay(settings, "rebuilt", workers=0)
    assert (report.events_applied, report.gaps) == (total, ())
    for table in TABLES:
        assert await table_rows(db, "rebuilt", table) == await table_rows(db, "public", table), table
    portable = [
        m.seq
        async for batch in read_range(nc, streams.commands, subjects.all_commands, 1, 200, bare=False)
        for m in batch
    ]
    assert portable == list(range(1, 201))
