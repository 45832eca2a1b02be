"""The audit projector against real JetStream and Postgres: rows, idempotency, crashes, outages, replay."""

import asyncio
import os
import signal
import sys
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from services.audit_projector.app import build_app
from services.audit_projector.replay import TargetNotEmpty, replay
from services.audit_projector.store import AuditStore, create_pool
from services.audit_projector.stream_reader import stored_message
from shared.admission import CommandRules
from shared.bus import envelope_headers
from shared.messages import (
    Envelope,
    Payload,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    make_envelope,
)
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects
from tests.conftest import REPO_ROOT, AppRunner, eventually

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
        RunSubmitted(agent="demo", input={"q": run_id}), tenant=tenant, subject=run_id, actor="alice", source="test"
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
            make_envelope(payload, tenant=tenant, subject=run_id, actor="svc", source="test", caused_by=envelopes[-1])
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
    pool = await create_pool(settings.database_url)
    store = AuditStore(pool, CommandRules(Subjects(settings.subject_prefix), settings.max_command_bytes))
    await store.ensure_schema(list(names.audited))
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
    env = {
        **os.environ,
        "WARDEN_NATS_URL": settings.nats_url,
        "WARDEN_DATABASE_URL": settings.database_url,
        "WARDEN_SUBJECT_PREFIX": settings.subject_prefix,
        "WARDEN_LOG_LEVEL": "WARNING",
    }

    async def start_projector() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.audit_projector", env=env, cwd=REPO_ROOT, stderr=asyncio.subprocess.DEVNULL
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
    pool = await create_pool(settings.database_url)
    await AuditStore(pool, CommandRules(Subjects(settings.subject_prefix), settings.max_command_bytes)).ensure_schema(
        ["S"]
    )
    await pool.close()
    await db.execute(
        "INSERT INTO events (stream, stream_seq, nats_subject, stored_at, tenant) VALUES ('S', 1, 'x', now(), 't')"
    )
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("UPDATE events SET tenant = 'other'")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("DELETE FROM events")


class TcpProxy:
    """A loopback TCP proxy to Postgres that a test can cut (drop and refuse connections) and restore."""

    def __init__(self, target_host: str, target_port: int, database_url: str) -> None:
        self.target = (target_host, target_port)
        self.database_url = database_url
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.open = True

    @classmethod
    async def start(cls, database_url: str) -> "TcpProxy":
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
