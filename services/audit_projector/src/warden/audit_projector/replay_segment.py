"""Replaying one segment (consecutive sequences of one stream), in a worker process or in the caller's.

Reads the segment with `stream_reader`, projects it with the live projector's own `project`, COPYs
its `events` rows in chunks while projecting the next, settles rows Postgres refuses as the live
projector does, and returns the read-model rows merged per key for the coordinator (`replay`)
to apply in stream order.

The rows' chain values depend on every earlier row of their stream, so a segment chains its rows
from the heads the segment before it ended on, handed over through a `HeadsRelay`: a segment
projects while it waits for them (its chunks queue up), and hands its own on as soon as its last
chunk is COPYed. Only the chaining is sequential, and it is the cheap part.
"""

import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from warden.admission import CommandRules
from warden.audit_chain import ChainHeads
from warden.audit_projector.copy_codec import connect_for_copy
from warden.audit_projector.projection import (
    EVENT_COLUMNS,
    DeadLetterRow,
    Rows,
    StoredMessage,
    project,
    raw_event_row,
    unstorable_dead_letter,
)
from warden.audit_projector.store import (
    CONTENT_REFUSALS,
    AuditStore,
    create_pool,
)
from warden.audit_projector.stream_reader import read_range
from warden.decoding import recordable_text
from warden.identity import connect_options
from warden.subjects import Subjects
from warden.wire import connect

log = structlog.get_logger(__name__)

# Events rows per COPY, and the most bytes of messages one COPY holds: large enough that a COPY's
# round trip does not matter, small enough that a chunk of 1 MiB messages is not a gigabyte.
COPY_CHUNK = 10_000
COPY_CHUNK_BYTES = 16 * 1024 * 1024
# The most sequences in one segment: a segment waiting for its heads holds its projected rows.
MAX_SEGMENT = 20 * COPY_CHUNK


@dataclass(frozen=True)
class Segment:
    """Consecutive sequences of one stream, replayed as a unit."""

    index: int
    stream: str
    filter_subject: str
    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class ReplayTarget:
    nats_url: str
    database_url: str
    schema: str
    subject_prefix: str
    max_command_bytes: int
    bare_reader: bool = True
    # The identity the segment workers read the streams as (the projector's).
    seed_file: Path | None = None

    @property
    def rules(self) -> CommandRules:
        return CommandRules(Subjects(self.subject_prefix), self.max_command_bytes)


@dataclass
class SegmentResult:
    """A segment's `events` rows are committed; its read-model rows are returned, merged, to apply in order."""

    segment: Segment
    applied: int = 0
    last_seq: int = 0
    rows: Rows = field(default_factory=Rows)
    cpu_seconds: float = 0.0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # missing sequences, first and last
    dead_letters: list[DeadLetterRow] = field(default_factory=list)  # messages Postgres refused even raw


class SegmentFailed(RuntimeError):
    """The segment before this one failed, so the heads this one starts from will never come."""


class HeadsRelay:
    """Hands each segment the chain heads its stream's previous segment ended on.

    `queues[i]` carries segment i's starting heads (per tenant), or None if the segment before it
    failed. Queues from a multiprocessing manager reach worker processes; plain ones serve a replay
    in one process, where segments run in order and the heads are always there already.
    """

    def __init__(self, queues: Sequence[Any], next_in_stream: Sequence[bool]) -> None:
        self.queues = queues
        self.next_in_stream = next_in_stream

    async def start(self, segment: Segment) -> ChainHeads:
        queue = self.queues[segment.index]
        heads = queue.get_nowait() if queue.qsize() else await asyncio.to_thread(queue.get)
        if heads is None:
            raise SegmentFailed(f"segment {segment.index - 1} failed: {segment.stream} cannot be chained on")
        return ChainHeads({(segment.stream, tenant): head for tenant, head in heads.items()})

    def finish(self, segment: Segment, heads: ChainHeads | None) -> None:
        """Hand the heads on to the stream's next segment (None: this one failed)."""
        if self.next_in_stream[segment.index]:
            handed = None if heads is None else heads.for_stream(segment.stream)
            self.queues[segment.index + 1].put(handed)


class _DryRun(Exception):
    """Raised to roll a savepoint back on purpose."""


async def _settle_refusals(
    rules: CommandRules, messages: Sequence[StoredMessage], refusals: asyncpg.Pool, result: SegmentResult
) -> Rows:
    """Project messages one by one, the way the live projector does when Postgres refuses a batch.

    Each message's rows are tried with the live projector's own statements, in a savepoint that
    is always rolled back; a message whose rows are refused becomes a raw `events` row with the
    database's reason, and one whose raw row is refused too becomes a dead letter, exactly as
    `AuditStore._write_one_by_one` records them.
    """
    rows = Rows()
    async with refusals.acquire() as connection, connection.transaction():
        for message in messages:
            single = project([message], rules)
            refusal = await _refused(connection, single)
            if refusal is not None:
                reason = f"postgres refused the row: {refusal}"
                single = Rows(events=[raw_event_row(message, rules.subjects, reason)])
                refused_again = await _refused(connection, single)
                if refused_again is not None:
                    text = recordable_text(f"{reason}; stored raw, refused again: {refused_again}", 2000)
                    result.dead_letters.append(unstorable_dead_letter(message, text))
                    continue
            rows.absorb(single)
    return rows


async def _refused(connection: asyncpg.pool.PoolConnectionProxy, rows: Rows) -> BaseException | None:
    """Why Postgres refuses these rows, or None if it takes them (nothing is kept either way)."""
    try:
        async with connection.transaction():
            await AuditStore._write(connection, rows)
            raise _DryRun
    except _DryRun:
        return None
    except CONTENT_REFUSALS as exc:
        return exc


@dataclass
class _Chained:
    """A chunk whose rows are chained, waiting for its COPY."""

    messages: list[StoredMessage]
    rows: Rows
    start: ChainHeads  # the heads before it
    records: list[tuple[Any, ...]]


class HandedOnTooEarly(RuntimeError):
    """Postgres refused a row of a segment whose chain heads the next segment already started from."""


async def _write_chunks(
    connection: asyncpg.Connection,
    target: ReplayTarget,
    chunks: asyncio.Queue[tuple[list[StoredMessage], Rows] | None],
    result: SegmentResult,
    relay: HeadsRelay,
) -> None:
    """Chain and COPY each chunk's events rows, then fold its read-model rows into the segment's, in order.

    Chunks are chained as soon as they are queued, ahead of their COPY, so the heads the segment
    ends on go to the next one as soon as the last chunk is projected, not once it is written.
    Should Postgres then refuse a row (its message is stored raw instead, which changes the chain),
    the replay fails rather than leave the next segment chained on the wrong heads.
    """
    refusals: asyncpg.Pool | None = None
    ahead = await relay.start(result.segment)  # the heads after every chunk chained so far
    waiting: collections.deque[_Chained] = collections.deque()
    handed_on = False

    def chain(messages: list[StoredMessage], rows: Rows) -> None:
        start = ahead.fork()
        records = ahead.chained(rows.events, canonical_text=True)
        waiting.append(_Chained(messages, rows, start, records))

    try:
        while True:
            # Chain what is queued (waiting for more only when nothing is left to write).
            while not handed_on and (not waiting or not chunks.empty()):
                chunk = await chunks.get()
                if chunk is None:
                    relay.finish(result.segment, ahead)
                    handed_on = True
                    break
                chain(*chunk)
            if not waiting:
                break
            item = waiting.popleft()
            try:
                async with connection.transaction():  # a savepoint: a refused chunk leaves no rows
                    await connection.copy_records_to_table(
                        "events", records=item.records, columns=EVENT_COLUMNS, schema_name=target.schema
                    )
            except CONTENT_REFUSALS as exc:
                if handed_on:
                    raise HandedOnTooEarly(
                        f"postgres refused a row of {target.schema}.events ({exc}) after the chain heads of "
                        "its segment were handed on; replay again into a new schema with workers=0"
                    ) from exc
                log.warning("replay chunk has a row postgres refuses; settling row by row", error=str(exc))
                # The live projector's pool settings, so its statements fail (or not) as they do live.
                refusals = refusals or await create_pool(target.database_url, schema=target.schema, size=1)
                item.rows = await _settle_refusals(target.rules, item.messages, refusals, result)
                # Chain it, and every chunk after it, again from the heads before it.
                later = [(chained.messages, chained.rows) for chained in waiting]
                waiting.clear()
                ahead.adopt(item.start.fork())
                item.records = ahead.chained(item.rows.events, canonical_text=True)
                for messages, rows in later:
                    chain(messages, rows)
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "events", records=item.records, columns=EVENT_COLUMNS, schema_name=target.schema
                    )
            item.rows.events.clear()
            result.rows.absorb(item.rows)
            result.applied += len(item.messages)
            result.last_seq = item.messages[-1].seq
    finally:
        if refusals is not None:
            await refusals.close()


class _HoleFinder:
    """Notes the sequences of a range that never arrived (messages deleted or purged from the stream)."""

    def __init__(self, first_seq: int, last_seq: int) -> None:
        self.expected = first_seq
        self.last_seq = last_seq
        self.holes: list[tuple[int, int]] = []

    def saw(self, batch: Sequence[StoredMessage]) -> None:
        for message in batch:
            if message.seq > self.expected:
                self.holes.append((self.expected, message.seq - 1))
            self.expected = message.seq + 1

    def finish(self) -> list[tuple[int, int]]:
        if self.expected <= self.last_seq:
            self.holes.append((self.expected, self.last_seq))
        return self.holes


async def replay_segment_async(target: ReplayTarget, segment: Segment, relay: HeadsRelay) -> SegmentResult:
    """Read, project and COPY one segment's events; return its merged read-model rows and its holes."""
    try:
        return await _replay_segment(target, segment, relay)
    except BaseException:
        relay.finish(segment, None)  # the next segment stops waiting for heads that will not come
        raise


async def _replay_segment(target: ReplayTarget, segment: Segment, relay: HeadsRelay) -> SegmentResult:
    cpu_started = time.process_time()
    rules = target.rules
    result = SegmentResult(segment)
    holes = _HoleFinder(segment.first_seq, segment.last_seq)
    nc = await connect(target.nats_url, **connect_options(target.seed_file))
    connection = await connect_for_copy(target.database_url)
    # Projecting the next chunk overlaps writing this one. Unbounded: while the writer waits for the
    # heads to chain on, the whole segment may queue up (MAX_SEGMENT bounds it).
    chunks: asyncio.Queue[tuple[list[StoredMessage], Rows] | None] = asyncio.Queue()
    try:
        async with connection.transaction():
            writer = asyncio.create_task(_write_chunks(connection, target, chunks, result, relay))
            try:
                messages: list[StoredMessage] = []
                size = 0
                rows = Rows()
                async for batch in read_range(
                    nc,
                    segment.stream,
                    segment.filter_subject,
                    segment.first_seq,
                    segment.last_seq,
                    bare=target.bare_reader,
                    seed_file=target.seed_file,
                ):
                    holes.saw(batch)
                    project(batch, rules, rows)
                    messages += batch
                    size += sum(len(message.data) for message in batch)
                    if len(messages) >= COPY_CHUNK or size >= COPY_CHUNK_BYTES:
                        await _put(chunks, (messages, rows), writer)
                        messages, size, rows = [], 0, Rows()
                if messages:
                    await _put(chunks, (messages, rows), writer)
                await _put(chunks, None, writer)
                await writer
            finally:
                writer.cancel()
    finally:
        await connection.close()
        await nc.close()
    result.gaps = holes.finish()
    result.cpu_seconds = time.process_time() - cpu_started
    return result


async def _put(
    chunks: asyncio.Queue[tuple[list[StoredMessage], Rows] | None],
    item: tuple[list[StoredMessage], Rows] | None,
    writer: asyncio.Task[None],
) -> None:
    """Queue a chunk for the writer, failing at once if the writer has failed."""
    put = asyncio.ensure_future(chunks.put(item))
    await asyncio.wait([put, writer], return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        writer.result()  # raises the writer's error
        raise RuntimeError("replay writer stopped early")


def replay_segment(target: ReplayTarget, segment: Segment, relay: HeadsRelay) -> SegmentResult:
    """Entry point of a worker process."""
    with cyclic_gc_paused():
        return asyncio.run(replay_segment_async(target, segment, relay))


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, then collect once.

    A replay allocates millions of short-lived objects (messages, rows, models) that form no
    reference cycles, so reference counting frees them; the cyclic collector, triggered by the
    allocations, would keep traversing every live object in the process for nothing (measured:
    about a sixth of a segment's CPU time).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()
