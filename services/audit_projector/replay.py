"""Rebuild the projections from JetStream sequence 1 into a fresh schema, with the live projector's code."""

import asyncio
import time
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.audit_projector.handlers import stored_message
from services.audit_projector.projection import StoredMessage
from services.audit_projector.store import AuditStore, create_pool
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

FETCH_BATCH = 5000
WRITE_BATCH = 5000


@dataclass(frozen=True)
class ReplayReport:
    schema: str
    events_applied: int
    seconds: float
    per_stream: dict[str, int]

    @property
    def events_per_second(self) -> float:
        return self.events_applied / self.seconds if self.seconds > 0 else 0.0


class TargetNotEmpty(RuntimeError):
    """Replay writes only into an empty schema, so it never mixes with existing rows."""


async def _read_stream(
    nc: NatsClient, stream: str, filter_subject: str, queue: asyncio.Queue[list[StoredMessage] | None]
) -> None:
    """Read the stream from sequence 1 to its last message at start, in batches, onto the queue."""
    js = nc.jetstream()
    last_seq = (await js.stream_info(stream)).state.last_seq
    if last_seq == 0:
        await queue.put(None)
        return
    subscription = await js.pull_subscribe(
        filter_subject,
        stream=stream,
        # Ephemeral and unacknowledged: a replay reads, it must not disturb any consumer's state.
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0),
    )
    try:
        seen = 0
        while seen < last_seq:
            messages = await subscription.fetch(FETCH_BATCH, timeout=5.0)
            batch = [stored_message(message) for message in messages if message.metadata.sequence.stream <= last_seq]
            if batch:
                await queue.put(batch)
            seen = messages[-1].metadata.sequence.stream
    finally:
        await subscription.unsubscribe()
        await queue.put(None)


async def replay(settings: Settings, schema: str, database_url: str | None = None) -> ReplayReport:
    """Project every audited stream from sequence 1 into `schema` (created; must be empty)."""
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    url = database_url or settings.database_url
    bootstrap = await create_pool(url, size=1)
    try:
        await bootstrap.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        has_rows = await bootstrap.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = 'events'", schema
        )
        if has_rows and await bootstrap.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{schema}".events)'):
            raise TargetNotEmpty(f"schema {schema!r} already has events; replay into a new schema")
    finally:
        await bootstrap.close()

    pool = await create_pool(url, schema=schema, size=2)
    nc = await nats.connect(settings.nats_url)
    filters = {streams.commands: subjects.all_commands, streams.events: subjects.all_events}
    per_stream: dict[str, int] = {}
    started = time.perf_counter()
    try:
        store = AuditStore(pool, subjects)
        await store.ensure_schema(list(filters))
        for stream, filter_subject in filters.items():
            # Reading the next batch overlaps writing this one: the queue holds at most two batches.
            queue: asyncio.Queue[list[StoredMessage] | None] = asyncio.Queue(maxsize=2)
            reader = asyncio.create_task(_read_stream(nc, stream, filter_subject, queue))
            applied = 0
            while (batch := await queue.get()) is not None:
                for start in range(0, len(batch), WRITE_BATCH):
                    applied += await store.apply(stream, batch[start : start + WRITE_BATCH])
            await reader
            per_stream[stream] = applied
    finally:
        await nc.close()
        await pool.close()
    seconds = time.perf_counter() - started
    report = ReplayReport(schema, sum(per_stream.values()), seconds, per_stream)
    log.info(
        "replay finished",
        schema=schema,
        events=report.events_applied,
        seconds=round(seconds, 3),
        events_per_second=round(report.events_per_second),
    )
    return report
