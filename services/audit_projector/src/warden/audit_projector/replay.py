"""Rebuild the projections from JetStream sequence 1 into a fresh schema, with the live projector's code.

A replay projects every stored message with `projection.project`, the live projector's own code,
so it gives the same rows. What differs is how messages arrive and rows leave, because a replay
of a long history must be fast (and a replay is CPU-bound in Python):

- Reading: a bare NATS connection pulls from an ephemeral, unacknowledged consumer and parses
  the wire protocol itself, in bulk, with what is in flight bounded in bytes (stream_reader.py).
- Parallelism: the streams are cut into segments of consecutive sequences, projected by worker
  processes (`replay_segment`); small replays run in this process. This module is the
  coordinator; binary COPY encoding is in `copy_codec`.
- Writing `events`: the target is fresh, so rows cannot conflict: each segment COPYs its rows, in
  chunks, while it projects the next chunk. Secondary indexes are built once all rows are in,
  and autovacuum waits until the end.
- Read models (runs, tool_calls, decisions, rejected_commands, dead_letters): each segment returns its rows
  merged per key (`projection.Rows`, the live upserts' rules in memory), and this process applies
  them in stream order, commands stream first, as one sequential replay would
  (`_ReadModelWriter`).

A row Postgres refuses is handled as the live projector handles it: the message is recorded raw,
with the database's reason, or as a dead letter if even that is refused (`replay_segment`).
Sequences missing from a stream (deleted or purged messages) are found, written to `stream_gaps`
as the live projector writes them, and reported (`ReplayReport.gaps`): a replay never passes a
hole off as a complete history. A replay that fails leaves an incomplete schema behind: drop it
and replay into a new one.

Worker processes are started with multiprocessing's spawn method, which imports the calling
program's main module again: call `replay` under `if __name__ == "__main__":` (the `warden` command
does).
"""

import asyncio
import concurrent.futures
import multiprocessing
import multiprocessing.managers
import os
import queue
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog

from warden.admission import CommandRules
from warden.audit_projector.copy_codec import connect_for_copy
from warden.audit_projector.projection import (
    DEAD_LETTER_COLUMNS,
    DECISION_COLUMNS,
    REJECTION_COLUMNS,
    RUN_COLUMNS,
    TOOL_CALL_COLUMNS,
    DeadLetterRow,
    Rows,
)
from warden.audit_projector.replay_segment import (
    COPY_CHUNK,
    MAX_SEGMENT,
    HeadsRelay,
    ReplayTarget,
    Segment,
    SegmentResult,
    cyclic_gc_paused,
    replay_segment,
    replay_segment_async,
)
from warden.audit_projector.store import (
    INSERT_DEAD_LETTER,
    INSERT_GAP,
    MERGE_RUN_ON_CONFLICT,
    MERGE_TOOL_CALL_ON_CONFLICT,
    AuditStore,
    create_pool,
)
from warden.database import DatabaseRole
from warden.identity import connect_options
from warden.permissions import Role
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import connect

log = structlog.get_logger(__name__)

# Below this many messages, worker processes cost more (start-up, imports) than they save.
PARALLEL_THRESHOLD = 50_000

Gap = tuple[str, int, int]  # (stream, first missing sequence, last missing sequence)


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did: messages applied (per stream), the sequences it found missing, how long it took."""

    schema: str
    events_applied: int
    seconds: float
    per_stream: dict[str, int]
    # CPU time spent reading, projecting and COPYing, summed over segments (and worker processes).
    segment_cpu_seconds: float = 0.0
    gaps: tuple[Gap, ...] = ()

    @property
    def events_per_second(self) -> float:
        return self.events_applied / self.seconds if self.seconds > 0 else 0.0


class TargetNotEmpty(RuntimeError):
    """Replay writes only into an empty schema, so it never mixes with existing rows."""


class _ReadModelWriter:
    """Applies segments' read-model rows in stream order, leaving what the live upserts would leave.

    The target tables start empty, so:
    - decisions, rejected_commands and dead_letters keep the first row per key (ON CONFLICT DO
      NOTHING): a row whose key was written before is dropped here, and the rest are COPYed at once;
    - a runs or tool_calls row merges with every later row of its key, so those are merged in
      memory (`Rows`) and COPYed once every segment is in. Should they pass MAX_PENDING keys,
      they are flushed early: COPYed into a staging table and merged in with the live
      projector's own ON CONFLICT clauses.
    """

    MAX_PENDING = 500_000

    def __init__(self, connection: asyncpg.Connection, schema: str) -> None:
        self.connection = connection
        self.schema = schema
        self.pending = Rows()
        self.flushed = False
        self.decision_keys: set[tuple[str, str]] = set()
        self.rejection_keys: set[tuple[str, int]] = set()
        self.dead_letter_keys: set[tuple[str, int, str]] = set()

    async def apply(self, rows: Rows) -> None:
        decisions = [row for key, row in rows.decisions.items() if key not in self.decision_keys]
        self.decision_keys.update(rows.decisions)
        rejections = [row for key, row in rows.rejections.items() if key not in self.rejection_keys]
        self.rejection_keys.update(rows.rejections)
        await self._copy("decisions", DECISION_COLUMNS, decisions)
        await self._copy("rejected_commands", REJECTION_COLUMNS, rejections)
        dead_letters = [row for key, row in rows.dead_letters.items() if key not in self.dead_letter_keys]
        self.dead_letter_keys.update(rows.dead_letters)
        await self._copy("dead_letters", DEAD_LETTER_COLUMNS, dead_letters)
        for run in rows.run_rows():
            self.pending.merge_run(run)
        for tool_call in rows.tool_call_rows():
            self.pending.merge_tool_call(tool_call)
        if len(self.pending.runs) + len(self.pending.tool_calls) > self.MAX_PENDING:
            await self.flush()

    async def flush(self) -> None:
        merges = (
            ("runs", RUN_COLUMNS, MERGE_RUN_ON_CONFLICT, self.pending.run_rows()),
            ("tool_calls", TOOL_CALL_COLUMNS, MERGE_TOOL_CALL_ON_CONFLICT, self.pending.tool_call_rows()),
        )
        for table, columns, on_conflict, records in merges:
            if not self.flushed:  # the tables are still empty: nothing to merge with
                await self._copy(table, columns, records)
                continue
            names = ", ".join(columns)
            await self.connection.execute(
                f'CREATE TEMP TABLE IF NOT EXISTS "staging_{table}" (LIKE "{self.schema}".{table}) ON COMMIT DROP'
            )
            await self.connection.copy_records_to_table(f"staging_{table}", records=records, columns=columns)
            await self.connection.execute(
                f'INSERT INTO "{self.schema}".{table} AS {table} ({names}) '
                f'SELECT {names} FROM "staging_{table}" {on_conflict}; TRUNCATE "staging_{table}"'
            )
        self.pending = Rows()
        self.flushed = True

    async def _copy(self, table: str, columns: Sequence[str], records: Sequence[tuple[Any, ...]]) -> None:
        if records:
            await self.connection.copy_records_to_table(
                table, records=records, columns=columns, schema_name=self.schema
            )


def _segments(ranges: Sequence[tuple[str, str, int]], size: int) -> list[Segment]:
    """Cut each (stream, filter, last_seq) into segments of at most `size` sequences, in stream order."""
    segments: list[Segment] = []
    for stream, filter_subject, last_seq in ranges:
        for first in range(1, last_seq + 1, size):
            segments.append(Segment(len(segments), stream, filter_subject, first, min(first + size - 1, last_seq)))
    return segments


async def prepare_target(url: str, schema: str, rules: CommandRules, streams: list[str]) -> dict[str, list[str]]:
    """Create the target's tables; return, per table, the definitions of the indexes left to build.

    Postgres builds an index over a loaded table (one sort) several times faster than it
    maintains it row by row during the load, so the secondary indexes are dropped now and built
    again, from their own definitions, once every row is in.
    """
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
    pool = await create_pool(url, schema=schema, size=1)
    try:
        await AuditStore(pool, rules).ensure_schema(streams)
        indexes = await pool.fetch(
            "SELECT i.tablename, i.indexname, i.indexdef FROM pg_indexes i JOIN pg_index x ON x.indexrelid = "
            "format('%I.%I', i.schemaname, i.indexname)::regclass "
            "WHERE i.schemaname = $1 AND i.tablename = any($2::text[]) AND NOT x.indisprimary",
            schema,
            _LOADED_TABLES,
        )
        deferred: dict[str, list[str]] = {table: [] for table in _LOADED_TABLES}
        for index in indexes:
            await pool.execute(f'DROP INDEX "{schema}"."{index["indexname"]}"')
            deferred[index["tablename"]].append(index["indexdef"])
        # Vacuuming the tables while they fill would scan them again and again; it runs afterwards.
        for table in _LOADED_TABLES:
            await pool.execute(f'ALTER TABLE "{schema}".{table} SET (autovacuum_enabled = off)')
    finally:
        await pool.close()
    return deferred


_LOADED_TABLES = ("events", "runs", "rejected_commands", "decisions", "tool_calls")
_INDEX_MEMORY = "SET maintenance_work_mem = '256MB'"


async def _build_indexes(url: str, definitions: Sequence[str]) -> None:
    """Build deferred indexes of committed tables, two at a time (one per connection)."""

    async def build(queue: list[str]) -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(_INDEX_MEMORY)
            while queue:
                await connection.execute(queue.pop(0))
        finally:
            await connection.close()

    queue = list(definitions)
    await asyncio.gather(*(build(queue) for _ in range(min(2, len(queue)))))


def default_workers() -> int:
    """One worker process per core (up to four): the workers are what keeps the cores busy."""
    return max(1, min(4, os.cpu_count() or 1))


async def replay(
    settings: Settings,
    schema: str,
    database_url: str | None = None,
    *,
    workers: int | None = None,
    segment_size: int | None = None,
    bare_reader: bool = True,
) -> ReplayReport:
    """Project every audited stream from sequence 1 into `schema` (created; must be empty).

    `workers` processes project segments of `segment_size` sequences in parallel; by default one
    per core for replays of at least PARALLEL_THRESHOLD messages, none (this process) below.
    `bare_reader=False` reads through nats-py only (see `stream_reader.read_range`): for comparison.
    """
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    # Creating a schema and its tables is the owner role's work.
    url = database_url or settings.database_url_for(DatabaseRole.OWNER)
    filters = {streams.commands: subjects.all_commands, streams.events: subjects.all_events}
    seed_file = settings.seed_file_for(Role.AUDIT_PROJECTOR)
    target = ReplayTarget(
        settings.nats_url, url, schema, settings.subject_prefix, settings.max_command_bytes, bare_reader, seed_file
    )

    nc = await connect(settings.nats_url, **connect_options(seed_file))
    try:
        js = nc.jetstream()
        last_seqs = {stream: (await js.stream_info(stream)).state.last_seq for stream in filters}
    finally:
        await nc.close()
    total = sum(last_seqs.values())
    if workers is None:
        workers = default_workers() if total >= PARALLEL_THRESHOLD else 0
    size = segment_size or min(MAX_SEGMENT, max(COPY_CHUNK, -(-total // max(1, workers * 6))))
    segments = _segments([(stream, filters[stream], last_seqs[stream]) for stream in filters], size)

    started = time.perf_counter()
    executor = _start_workers(workers) if workers and len(segments) > 1 else None
    try:
        with cyclic_gc_paused():
            deferred_indexes = await prepare_target(url, schema, target.rules, list(filters))
            results = _run_segments(target, segments, executor)
            applied = await _apply_in_order(url, schema, list(filters), results, deferred_indexes)
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - started
    report = ReplayReport(
        schema,
        sum(applied.per_stream.values()),
        seconds,
        applied.per_stream,
        applied.cpu_seconds,
        tuple(applied.gaps),
    )
    for stream, first, last in report.gaps:
        log.error("messages missing from the stream", stream=stream, first_seq=first, last_seq=last)
    log.info(
        "replay finished",
        schema=schema,
        events=report.events_applied,
        seconds=round(seconds, 3),
        events_per_second=round(report.events_per_second),
        workers=workers if executor else 0,
        segments=len(segments),
    )
    return report


def _start_workers(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn, not fork: the parent runs an event loop and holds sockets a child must not share.
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for _ in range(workers):
        executor.submit(int)  # start the processes (and their imports) while the schema is prepared
    return executor


def _run_segments(
    target: ReplayTarget, segments: Sequence[Segment], executor: concurrent.futures.ProcessPoolExecutor | None
) -> AsyncIterator[SegmentResult]:
    """Each segment's result, in segment order (workers may finish them in any order)."""
    if executor is None:
        return _sequential(target, segments, _relay(segments, [queue.Queue() for _ in segments]))
    # Queues a worker process can reach: served by a manager process, started for this replay.
    manager = multiprocessing.get_context("spawn").Manager()
    relay = _relay(segments, [manager.Queue() for _ in segments])
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(executor, replay_segment, target, segment, relay) for segment in segments]
    return _in_order(futures, manager)


def _relay(segments: Sequence[Segment], queues: Sequence[Any]) -> HeadsRelay:
    """A relay whose first segment of each stream starts from empty chains."""
    next_in_stream = [
        index + 1 < len(segments) and segments[index + 1].stream == segment.stream
        for index, segment in enumerate(segments)
    ]
    for segment, queue_ in zip(segments, queues, strict=True):
        if segment.first_seq == 1:
            queue_.put({})
    return HeadsRelay(queues, next_in_stream)


async def _sequential(
    target: ReplayTarget, segments: Sequence[Segment], relay: HeadsRelay
) -> AsyncIterator[SegmentResult]:
    for segment in segments:
        yield await replay_segment_async(target, segment, relay)


async def _in_order(
    futures: Sequence[asyncio.Future[SegmentResult]], manager: multiprocessing.managers.SyncManager
) -> AsyncIterator[SegmentResult]:
    try:
        for future in futures:
            yield await future
    finally:
        for future in futures:
            future.cancel()
        manager.shutdown()


@dataclass
class _Applied:
    """What the coordinator gathered from every segment, besides the rows it wrote."""

    per_stream: dict[str, int]
    cpu_seconds: float = 0.0
    gaps: list[Gap] = field(default_factory=list)


def merge_gaps(gaps: Sequence[Gap]) -> list[Gap]:
    """Join holes that touch (one deleted range can span two segments), in stream and sequence order."""
    merged: list[Gap] = []
    for stream, first, last in sorted(gaps):
        if merged and merged[-1][0] == stream and merged[-1][2] + 1 >= first:
            merged[-1] = (stream, merged[-1][1], max(merged[-1][2], last))
        else:
            merged.append((stream, first, last))
    return merged


async def _apply_in_order(
    url: str,
    schema: str,
    streams: list[str],
    results: AsyncIterator[SegmentResult],
    indexes: dict[str, list[str]],
) -> _Applied:
    """Apply each segment's read-model rows in order, then record holes, dead letters and positions.

    Once every segment is in, the deferred `events` indexes are built (on other connections:
    the workers committed those rows) while the last read-model rows are written, and then
    their own indexes. Each stream's position is the last sequence read, or past a hole at its end.
    """
    applied = _Applied(dict.fromkeys(streams, 0))
    positions: dict[str, int] = {}
    gaps: list[Gap] = []
    dead_letters: list[DeadLetterRow] = []
    connection = await connect_for_copy(url)
    try:
        async with connection.transaction():
            writer = _ReadModelWriter(connection, schema)
            async for result in results:
                await writer.apply(result.rows)
                stream = result.segment.stream
                applied.per_stream[stream] += result.applied
                applied.cpu_seconds += result.cpu_seconds
                gaps += [(stream, first, last) for first, last in result.gaps]
                dead_letters += result.dead_letters
                reached = max([result.last_seq, *(last for _, last in result.gaps)])
                if reached:
                    positions[stream] = max(positions.get(stream, 0), reached)
            await asyncio.gather(writer.flush(), _build_indexes(url, indexes["events"]))
            await connection.execute(_INDEX_MEMORY)
            for table in _LOADED_TABLES:
                for definition in indexes[table] if table != "events" else ():
                    await connection.execute(definition)
                await connection.execute(f'ALTER TABLE "{schema}".{table} RESET (autovacuum_enabled)')
            applied.gaps = merge_gaps(gaps)
            await connection.execute(f'SET LOCAL search_path = "{schema}"')
            await connection.executemany(INSERT_GAP, applied.gaps)
            await connection.executemany(INSERT_DEAD_LETTER, dead_letters)
            for stream, last_seq in positions.items():
                await connection.execute(
                    "UPDATE projector_positions SET last_seq = $2 WHERE stream = $1", stream, last_seq
                )
    finally:
        await connection.close()
    return applied
