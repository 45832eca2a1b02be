"""The audit projector against real JetStream and Postgres: rows, idempotency, crashes, outages, replay."""

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import REPO_ROOT, AppRunner, Servers, eventually, run_warden_cli, settings_env
from warden.admission import CommandRules
from warden.audit_projector import handlers
from warden.audit_projector.app import build_app
from warden.audit_projector.install import install_database
from warden.audit_projector.projection import StoredMessage
from warden.audit_projector.replay import TargetNotEmpty, replay
from warden.audit_projector.store import AuditStore, NotContiguous, create_pool
from warden.audit_projector.stream_reader import stored_message
from warden.bus import envelope_headers
from warden.database import DatabaseRole
from warden.messages import (
    Envelope,
    Payload,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
)
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.timeline import run_timeline

NOW = datetime.now(UTC)
TABLES = ("events", "runs", "rejected_commands", "decisions", "tool_calls", "projector_positions")


async def publish(nc: NatsClient, settings: Settings, envelope: Envelope[Any]) -> int:
    subjects = Subjects(settings.subject_prefix)
    ack = await nc.jetstream().publish(
        subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope)
    )
    return ack.seq


def run_lifecycle(tenant: str, run_id: str, steps: int) -> list[Envelope[Any]]:
    """A run's messages from submission to success, each caused by the one before."""
    submitted = make_envelope(
        RunSubmitted(agent="demo", input={"q": run_id}), tenant=tenant, entity_id=run_id, actor="alice", source="test"
    )
    payloads: list[Payload] = [
        RunQueued(decision_id="d-" + run_id, priority=5, agent="demo", request_seq=1),
        RunStarted(decision_id="d-" + run_id, worker="w1"),
        *(StepCompleted(step=i, kind="model_turn") for i in range(steps)),
        RunSucceeded(output={"answer": 42}, steps=steps, tool_calls=0),
    ]
    envelopes: list[Envelope[Any]] = [submitted]
    for payload in payloads:
        envelopes.append(
            make_envelope(payload, tenant=tenant, entity_id=run_id, actor="svc", source="test", caused_by=envelopes[-1])
        )
    return envelopes


async def stream_total(nc: NatsClient, settings: Settings) -> int:
    names = StreamNames.for_prefix(settings.subject_prefix)
    js = nc.jetstream()
    return sum([(await js.stream_info(name)).state.messages for name in names.audited])


async def table_rows(db: asyncpg.Connection, schema: str, table: str) -> list[tuple[Any, ...]]:
    rows = await db.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2')
    return [tuple(row.values()) for row in rows]


async def test_projects_events_and_runs(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Every stored message becomes an events row, and a run's lifecycle becomes one runs row."""
    for envelope in run_lifecycle("acme", "run-1", steps=3):
        await publish(nc, settings, envelope)
    await run_app(build_app(settings))
    await eventually(lambda: db.fetchval("SELECT count(*) = 7 FROM events"))
    run = await eventually(lambda: db.fetchrow("SELECT * FROM runs WHERE status = 'succeeded'"))
    assert (run["tenant"], run["run_id"], run["agent"], run["submitted_by"]) == ("acme", "run-1", "demo", "alice")
    assert run["steps"] == 3
    assert run["output"] == '{"answer": 42}'
    assert run["submitted_at"] < run["queued_at"] < run["started_at"] <= run["finished_at"]
    types = await db.fetch("SELECT type FROM events ORDER BY stream, stream_seq")
    assert [row["type"] for row in types][:3] == ["run.submitted", "run.queued", "run.started"]


async def test_apply_is_idempotent_under_redelivery(settings: Settings, nc: NatsClient, db: asyncpg.Connection) -> None:
    """Applying the same batch again, or an overlapping one, adds nothing and counts nothing twice."""
    for envelope in run_lifecycle("acme", "run-2", steps=4):
        await publish(nc, settings, envelope)
    names = StreamNames.for_prefix(settings.subject_prefix)
    subscription = await nc.jetstream().pull_subscribe(
        Subjects(settings.subject_prefix).all_events, stream=names.events
    )
    messages = [stored_message(m) for m in await subscription.fetch(6, timeout=5)]
    pool = await create_pool(settings.database_url_for(DatabaseRole.PROJECTOR))
    store = AuditStore(pool, CommandRules(Subjects(settings.subject_prefix), settings.max_command_bytes))
    await store.check_schema(list(names.audited))
    assert await store.apply(names.events, messages[:4]) == 4
    assert await store.apply(names.events, messages[:4]) == 0  # redelivered batch
    assert await store.apply(names.events, messages[2:]) == 2  # overlapping batch
    assert await store.apply(names.events, messages) == 0
    await pool.close()
    assert await db.fetchval("SELECT count(*) FROM events") == 6
    assert await db.fetchval("SELECT steps FROM runs") == 4
    assert await db.fetchval("SELECT last_seq FROM projector_positions WHERE stream = $1", names.events) == 6


async def test_duplicate_publish_is_stored_once(settings: Settings, nc: NatsClient) -> None:
    """A message republished with the same Nats-Msg-Id is acknowledged as a duplicate and not stored again."""
    envelope = run_lifecycle("acme", "run-3", steps=0)[0]
    subjects = Subjects(settings.subject_prefix)
    first = await nc.jetstream().publish(
        subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope, "key-1")
    )
    second = await nc.jetstream().publish(
        subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope, "key-1")
    )
    assert (first.duplicate, second.duplicate, second.seq) == (None, True, first.seq)
    assert await stream_total(nc, settings) == 1


async def test_killed_projector_loses_and_duplicates_nothing(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection
) -> None:
    """SIGKILL the projector process mid-stream, restart it: rows equal the stream's messages exactly."""
    runs, steps = 150, 30
    for i in range(runs):
        for envelope in run_lifecycle("acme", f"run-{i}", steps=steps):
            await publish(nc, settings, envelope)
    total = await stream_total(nc, settings)
    env = {**settings_env(settings), "WARDEN_LOG_LEVEL": "WARNING"}

    async def start_projector() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "warden.audit_projector", env=env, cwd=REPO_ROOT, stderr=asyncio.subprocess.DEVNULL
        )

    async def projected() -> int:
        try:
            return int(await db.fetchval("SELECT count(*) FROM events"))
        except asyncpg.UndefinedTableError:
            return 0

    first = await start_projector()
    killed_at = await eventually(projected, within=30, interval=0.01)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    assert 0 < killed_at < total, "the kill should land mid-stream"

    second = await start_projector()
    try:
        await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total), within=60)
    finally:
        second.terminate()
        await second.wait()
    assert await db.fetchval("SELECT count(*) FROM events") == total
    assert await db.fetchval("SELECT count(DISTINCT (stream, stream_seq)) FROM events") == total
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'succeeded' AND steps = $1", steps) == runs


async def test_waits_out_a_postgres_outage(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """With Postgres unreachable the projector keeps its batch and retries; once back, nothing is missing."""
    proxy = await TcpProxy.start(settings.database_url)
    proxied = settings.model_copy(update={"database_url": proxy.url})
    await run_app(build_app(proxied))
    for envelope in run_lifecycle("acme", "before", steps=1):
        await publish(nc, settings, envelope)
    await eventually(lambda: db.fetchval("SELECT count(*) = 5 FROM events"))

    proxy.cut()
    for envelope in run_lifecycle("acme", "during", steps=2):
        await publish(nc, settings, envelope)
    await asyncio.sleep(1.0)
    assert await db.fetchval("SELECT count(*) FROM events") == 5, "nothing can be written while Postgres is away"
    proxy.restore()
    await eventually(lambda: db.fetchval("SELECT count(*) = 11 FROM events"), within=30)
    assert await db.fetchval("SELECT status FROM runs WHERE run_id = 'during'") == "succeeded"
    await proxy.close()


async def test_replay_rebuilds_equal_tables(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Replaying the streams from sequence 1 into a fresh schema gives exactly the live tables."""
    for i in range(20):
        for envelope in run_lifecycle("acme" if i % 2 else "globex", f"run-{i}", steps=i % 4):
            await publish(nc, settings, envelope)
    subjects = Subjects(settings.subject_prefix)
    await nc.jetstream().publish(subjects.command("acme", "run.submitted"), b"\xff not json")
    await run_app(build_app(settings))
    total = await stream_total(nc, settings)
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total))

    report = await replay(settings, "rebuilt")
    assert report.events_applied == total
    assert report.events_per_second > 0
    for table in TABLES:
        live, rebuilt = await table_rows(db, "public", table), await table_rows(db, "rebuilt", table)
        assert live == rebuilt, f"{table} differs after replay"
    assert len(await table_rows(db, "rebuilt", "events")) == total
    with pytest.raises(TargetNotEmpty):
        await replay(settings, "rebuilt")


async def test_events_table_is_append_only(settings: Settings, db: asyncpg.Connection) -> None:
    """Updating or deleting an audit row is refused by the database itself."""
    await db.execute(
        "INSERT INTO events (stream, stream_seq, nats_subject, stored_at, tenant) VALUES ('S', 1, 'x', now(), 't')"
    )
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE events SET tenant = 'other'")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("DELETE FROM events")


class TcpProxy:
    """A loopback TCP proxy to a server (Postgres, NATS) a test can cut (drop and refuse connections) and restore."""

    def __init__(self, target_host: str, target_port: int, database_url: str) -> None:
        self.target = (target_host, target_port)
        self.database_url = database_url
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.open = True

    @classmethod
    async def start(cls, database_url: str) -> "TcpProxy":
        """A proxy to the server `database_url` (any scheme://host:port URL) names; `url` is that URL through it."""
        from urllib.parse import urlsplit  # noqa: PLC0415

        parts = urlsplit(database_url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432, database_url)
        proxy.server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
        proxy.port = proxy.server.sockets[0].getsockname()[1]
        return proxy

    @property
    def url(self) -> str:
        from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415

        parts = urlsplit(self.database_url)
        netloc = f"{parts.username}@127.0.0.1:{self.port}" if parts.username else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.writers.update({writer, upstream_writer})

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        self.open = False
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        assert self.server is not None
        self.server.close()


def as_stored(stream: str, seq: int, envelope: Envelope[Any], subjects: Subjects) -> StoredMessage:
    """An envelope as JetStream would hand it to the projector at `seq` (no server needed at this port)."""
    return StoredMessage(
        stream, seq, subjects.expected_subject(envelope), envelope_headers(envelope), envelope.to_bytes(), NOW
    )


async def fresh_store(settings: Settings, size: int = 2) -> tuple[asyncpg.Pool, AuditStore]:
    pool = await create_pool(settings.database_url_for(DatabaseRole.PROJECTOR), size=size)
    store = AuditStore(pool, CommandRules(Subjects(settings.subject_prefix), settings.max_command_bytes))
    await store.check_schema(list(StreamNames.for_prefix(settings.subject_prefix).audited))
    return pool, store


async def test_an_events_table_from_before_entity_id_is_migrated_in_place(
    servers: Servers, settings: Settings, db: asyncpg.Connection
) -> None:
    """A table whose column is still `subject` is renamed on install, its rows kept, and projection carries on."""
    subjects = Subjects(settings.subject_prefix)
    stream = StreamNames.for_prefix(settings.subject_prefix).events
    lifecycle = run_lifecycle("acme", "r1", steps=1)
    messages = [as_stored(stream, seq, envelope, subjects) for seq, envelope in enumerate(lifecycle[1:], start=1)]
    pool, store = await fresh_store(settings)
    await store.apply(stream, messages[:2])
    await db.execute("ALTER TABLE events RENAME COLUMN entity_id TO subject")  # as a table made before the rename

    # Installing again (as `warden up` does on every start) migrates the table; the projector cannot.
    assert settings.nats_credentials_dir is not None
    await install_database(
        servers.database_url, settings.database_url, settings.nats_credentials_dir, settings.subject_prefix
    )
    assert await store.apply(stream, messages) == len(messages) - 2
    await pool.close()
    entities = await db.fetch("SELECT DISTINCT entity_id FROM events")
    assert [row["entity_id"] for row in entities] == ["r1"]
    assert await db.fetchval("SELECT count(*) FROM events") == len(messages)


async def test_refused_rows_are_kept_raw_and_unstorable_messages_dead_lettered(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A message Postgres refuses is stored raw; one refused even raw is a dead letter; the rest of the batch lands."""
    subjects = Subjects(settings.subject_prefix)
    stream = StreamNames.for_prefix(settings.subject_prefix).events
    pool, store = await fresh_store(settings)
    # Stand-ins for whatever Postgres may refuse: a payload it will not take, a row it will not take at all.
    await db.execute("ALTER TABLE events ADD CHECK (payload IS NULL OR position('refused' in payload::text) = 0)")
    await db.execute("ALTER TABLE events ADD CHECK (position('unstorable' in nats_subject) = 0)")
    lifecycle = run_lifecycle("acme", "r1", steps=1)
    refused = make_envelope(
        RunFailed(reason="refused", error_type="E"), tenant="acme", entity_id="r2", actor="a", source="t"
    )
    messages = [as_stored(stream, seq, envelope, subjects) for seq, envelope in enumerate(lifecycle[1:3], start=1)]
    messages.append(as_stored(stream, 3, refused, subjects))
    messages.append(StoredMessage(stream, 4, f"{subjects.prefix}.evt.acme.run.unstorable.run.started", None, b"x", NOW))
    messages += [as_stored(stream, seq, envelope, subjects) for seq, envelope in enumerate(lifecycle[3:], start=5)]

    assert await store.apply(stream, messages) == len(messages)
    await pool.close()
    assert await db.fetchval("SELECT last_seq FROM projector_positions WHERE stream = $1", stream) == len(messages)
    raw = await db.fetchrow("SELECT type, raw, invalid_reason FROM events WHERE stream_seq = 3")
    assert raw is not None
    assert (raw["type"], raw["raw"]) == (None, refused.to_bytes())
    assert raw["invalid_reason"].startswith("postgres refused the row")
    assert await db.fetchval("SELECT count(*) FROM events WHERE stream_seq = 4") == 0
    dead = await db.fetchrow("SELECT * FROM dead_letters")
    assert dead is not None
    assert (dead["stream"], dead["stream_seq"]) == (stream, 4)
    assert "refused again" in dead["reason"]
    assert await db.fetchval("SELECT status FROM runs WHERE run_id = 'r1'") == "succeeded", "the rest landed"
    assert await db.fetchval("SELECT count(*) FROM runs WHERE run_id = 'r2'") == 0


async def test_a_batch_that_does_not_follow_the_position_is_refused(settings: Settings) -> None:
    """Applying sequences 3..4 over a stored position of 1 would leave a hole: refused, nothing written."""
    subjects = Subjects(settings.subject_prefix)
    stream = StreamNames.for_prefix(settings.subject_prefix).events
    pool, store = await fresh_store(settings)
    lifecycle = run_lifecycle("acme", "r1", steps=2)[1:]
    messages = [as_stored(stream, seq, envelope, subjects) for seq, envelope in enumerate(lifecycle, start=1)]
    assert await store.apply(stream, messages[:1]) == 1
    with pytest.raises(NotContiguous):
        await store.apply(stream, messages[2:4])
    assert await store.positions() == {stream: 1, StreamNames.for_prefix(settings.subject_prefix).commands: 0}
    await store.record_gap(stream, 2, 2)
    assert await store.apply(stream, messages[2:4]) == 2
    gaps = await pool.fetch("SELECT stream, first_seq, last_seq FROM stream_gaps")
    assert [tuple(gap) for gap in gaps] == [(stream, 2, 2)]
    await pool.close()


async def test_writing_one_by_one_never_deadlocks_with_the_other_stream(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A commands batch written message by message and an events batch touching the same rows both commit.

    Message by message, the commands batch locks tool call X, then run B (message order); the
    events batch locks run B, then tool call X (key order, table by table). Without one of
    them waiting for the other before taking any row, Postgres detects a deadlock.
    """
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    pool, store = await fresh_store(settings, size=4)
    # Hold tool call X's row long enough for the other batch to take its first rows.
    await db.execute(
        "CREATE FUNCTION hold_x() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.tool_call_id = 'X' THEN PERFORM pg_sleep(0.5); END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER hold_x AFTER INSERT OR UPDATE ON tool_calls FOR EACH ROW EXECUTE FUNCTION hold_x(); "
        "ALTER TABLE events ADD CHECK (payload IS NULL OR position('refused' in payload::text) = 0)"
    )

    def envelope(payload: Payload, run_id: str) -> Envelope[Any]:
        return make_envelope(payload, tenant="acme", entity_id=run_id, actor="alice", source="t")

    requested = ToolCallRequested(tool_call_id="X", step=0, agent="demo", tool="math.add")
    commands = [
        as_stored(streams.commands, 1, envelope(requested, "A"), subjects),
        as_stored(streams.commands, 2, envelope(RunSubmitted(agent="demo"), "B"), subjects),
        as_stored(streams.commands, 3, envelope(RunSubmitted(agent="demo", input={"q": "refused"}), "C"), subjects),
    ]
    completed = ToolCallCompleted(tool_call_id="X", step=0, tool="math.add", decision_id="d", outcome="ok")
    events = [
        as_stored(streams.events, 1, envelope(RunStarted(decision_id="d", worker="w"), "B"), subjects),
        as_stored(streams.events, 2, envelope(completed, "A"), subjects),
    ]

    async def events_a_moment_later() -> int:
        await asyncio.sleep(0.2)
        return await store.apply(streams.events, events)

    applied = await asyncio.gather(store.apply(streams.commands, commands), events_a_moment_later())
    assert list(applied) == [3, 2]
    await pool.close()
    row = await db.fetchrow("SELECT arguments, outcome FROM tool_calls WHERE tool_call_id = 'X'")
    assert row is not None
    assert (row["arguments"], row["outcome"]) == ("{}", "ok")


async def test_deleted_messages_are_recorded_as_gaps_live_and_in_replay(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Messages deleted before projection: the projector records each hole (event and row) and goes on;
    a replay finds the same holes and says so, and `warden audit replay` exits non-zero.

    Warden's audited streams refuse deletes; holes still come from streams made before they did,
    or restored from a damaged backup: such streams are made here.
    """
    js = nc.jetstream()
    for stream in StreamNames.for_prefix(settings.subject_prefix).audited:
        config = (await js.stream_info(stream)).config
        await js.delete_stream(stream)
        await js.add_stream(replace(config, deny_delete=False, deny_purge=False))
    for i in range(4):
        for envelope in run_lifecycle("acme", f"run-{i}", steps=2):
            await publish(nc, settings, envelope)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    for seq in (1, 2, 7, 12, 13, 14):  # the first messages, one alone, a run of three
        await js.delete_msg(streams.events, seq)
    await js.delete_msg(streams.commands, 2)
    expected = [(streams.commands, 2, 2), (streams.events, 1, 2), (streams.events, 7, 7), (streams.events, 12, 14)]

    await run_app(build_app(settings))

    async def gaps() -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await db.fetch("SELECT * FROM stream_gaps ORDER BY stream, first_seq")]

    await eventually(lambda: _equal(gaps(), expected))
    total = await stream_total(nc, settings)
    await eventually(lambda: db.fetchval("SELECT count(*) = $1 FROM events", total))
    noticed = await db.fetch("SELECT payload FROM events WHERE type = 'stream.gap_detected' ORDER BY stream_seq")
    found = [json.loads(row["payload"]) for row in noticed]
    assert sorted((gap["stream"], gap["first_seq"], gap["last_seq"]) for gap in found) == expected
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'succeeded'") == 4

    report = await replay(settings, "rebuilt")
    assert sorted(report.gaps) == expected
    for table in TABLES:
        assert await table_rows(db, "rebuilt", table) == await table_rows(db, "public", table), table
    result = await run_warden_cli(settings, "audit", "replay", "--schema", "again")
    assert result.status == 3
    assert json.loads(result.stdout)["missing"][0] == {"stream": streams.commands, "first_seq": 2, "last_seq": 2}
    assert f"{streams.events} is missing sequences 12..14" in result.stderr


async def _equal(found: Awaitable[Any], expected: Any) -> bool:
    return bool(await found == expected)


async def test_messages_lost_in_flight_are_fetched_again(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages the client drops between delivery and storage are fetched again, never acknowledged unstored.

    A tiny client-side buffer makes nats-py drop most of every batch, as a dropped connection
    or a leader change would: the projector sees the next batch skip them, finds them still in
    the stream, and fetches again from its stored position. Rows end up equal to messages.
    """
    monkeypatch.setattr(handlers, "PENDING_BYTES_LIMIT", 4096)
    monkeypatch.setattr(handlers, "IDLE_CHECK_SECONDS", 0.1)
    for i in range(30):
        for envelope in run_lifecycle("acme", f"run-{i}", steps=3):
            await publish(nc, settings, envelope)
    total = await stream_total(nc, settings)
    await run_app(build_app(settings))
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total), within=60)
    assert await db.fetchval("SELECT count(DISTINCT (stream, stream_seq)) FROM events") == total
    assert await db.fetchval("SELECT count(*) FROM stream_gaps") == 0, "nothing lost in flight is taken for a gap"
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'succeeded' AND steps = 3") == 30


async def test_a_timeline_follows_the_server_not_the_senders_clock(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A backdated event is told where the server stored it, with the time its sender claimed beside it."""
    subjects = Subjects(settings.subject_prefix)
    lifecycle = run_lifecycle("acme", "r1", steps=2)
    backdated_step = 4  # the second step.completed claims to have happened in 2020
    for index, envelope in enumerate(lifecycle):
        body = envelope.to_bytes()
        if index == backdated_step:
            document = json.loads(body)
            document["time"] = "2020-01-02T03:04:05.678000Z"
            body = json.dumps(document).encode()
        await nc.jetstream().publish(subjects.expected_subject(envelope), body, headers=envelope_headers(envelope))
    await run_app(build_app(settings))
    await eventually(lambda: db.fetchval("SELECT count(*) = 6 FROM events"))

    lines = await run_timeline(db, "acme", "r1")
    described = [line.split("  ", 1)[1] for line in lines]
    assert described == [
        'alice asked for a run of agent demo with input {"q": "r1"}',
        "scheduler: queued (priority 5)",
        "runner w1: started (attempt 1)",
        "step 0: model_turn: ",
        "step 1: model_turn: ",
        "run SUCCEEDED after 2 model turns and 0 tool calls",
    ]
    assert "(sent 2020-01-02 03:04:05.678)" in lines[4]
    assert "(sent 2020" not in lines[3] + lines[5]


@pytest.fixture
async def nats_proxy(settings: Settings) -> AsyncIterator[TcpProxy]:
    """A proxy to this test's NATS, closed after the apps that use it (ask for it before `run_app`)."""
    proxy = await TcpProxy.start(settings.nats_url)
    yield proxy
    await proxy.close()


async def test_a_connection_cut_between_delivery_and_storage_loses_nothing(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, nats_proxy: TcpProxy, run_app: AppRunner
) -> None:
    """The projector's NATS connection cut mid-stream, with batches delivered and not yet stored: once it is
    back, the rows equal the messages, none missing, none twice, and no hole recorded."""
    for i in range(300):
        for envelope in run_lifecycle("acme", f"run-{i}", steps=4):
            await publish(nc, settings, envelope)
    total = await stream_total(nc, settings)
    proxy = nats_proxy
    await run_app(build_app(settings.model_copy(update={"nats_url": proxy.url})))

    async def projected() -> int:
        try:
            return int(await db.fetchval("SELECT count(*) FROM events"))
        except asyncpg.UndefinedTableError:
            return 0

    cut_at = await eventually(projected, within=30, interval=0.005)
    proxy.cut()
    await asyncio.sleep(1.0)
    proxy.restore()
    assert cut_at < total, "the cut should land mid-stream"
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total), within=60)
    assert await db.fetchval("SELECT count(DISTINCT (stream, stream_seq)) FROM events") == total
    assert await db.fetchval("SELECT count(*) FROM events") == total
    assert await db.fetchval("SELECT count(*) FROM stream_gaps") == 0
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'succeeded' AND steps = 4") == 300
