"""Rebuild the projections from JetStream sequence 1 into a fresh schema, with the live projector's code.

A replay projects every stored message with `projection.project`, the live projector's own code,
so it gives the same rows. What differs is how messages arrive and rows leave, because a replay
of a long history must be fast (and a replay is CPU-bound in Python):

- Reading: a bare NATS connection pulls from an ephemeral, unacknowledged consumer and parses
  the wire protocol itself, in bulk (`PullReader`); nats-py's subscription machinery costs more
  per message than projecting it. Servers it cannot talk to (TLS) are read through nats-py.
- Parallelism: the streams are cut into segments of consecutive sequences, projected by worker
  processes (`replay_segment`); small replays run in this process.
- Writing `events`: the target is fresh, so rows cannot conflict: each segment COPYs its rows, in
  chunks, while it projects the next chunk. Secondary indexes are built once all rows are in,
  and autovacuum waits until the end.
- Read models (runs, tool_calls, decisions, rejected_commands): each segment returns its rows
  merged per key (`projection.Rows`, the live upserts' rules in memory), and this process applies
  them in stream order, commands stream first, as one sequential replay would
  (`_ReadModelWriter`).

A row Postgres refuses is handled as the live projector handles it: the message is recorded raw,
with the database's reason (`_settle_refusals`). A replay that fails leaves an incomplete schema
behind: drop it and replay into a new one.

Worker processes are started with multiprocessing's spawn method, which imports the calling
program's main module again: call `replay` under `if __name__ == "__main__":` (the `warden` command
does).
"""

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import multiprocessing
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self
from urllib.parse import ParseResult

import asyncpg
import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.audit_projector.handlers import stored_message
from services.audit_projector.projection import (
    DECISION_COLUMNS,
    EVENT_COLUMNS,
    REJECTION_COLUMNS,
    RUN_COLUMNS,
    TOOL_CALL_COLUMNS,
    Rows,
    StoredMessage,
    project,
    raw_event_row,
)
from services.audit_projector.store import (
    MERGE_RUN_ON_CONFLICT,
    MERGE_TOOL_CALL_ON_CONFLICT,
    AuditStore,
    create_pool,
)
from shared.bus import MSG_ID_HEADER
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects

log = structlog.get_logger(__name__)

# Messages per pull request, and how many may be requested but not yet projected: enough to keep
# the server sending while Python projects, few enough to bound memory.
PULL_BATCH = 5_000
PULL_WINDOW = 3 * PULL_BATCH
# Events rows per COPY: large enough that a COPY's round trip does not matter.
COPY_CHUNK = 10_000
# Below this many messages, worker processes cost more (start-up, imports) than they save.
PARALLEL_THRESHOLD = 50_000
# A pull that brings nothing for this long means the server stopped answering.
READ_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did: messages applied (per stream), and how long it took."""

    schema: str
    events_applied: int
    seconds: float
    per_stream: dict[str, int]
    # CPU time spent reading, projecting and COPYing, summed over segments (and worker processes).
    segment_cpu_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events_applied / self.seconds if self.seconds > 0 else 0.0


class TargetNotEmpty(RuntimeError):
    """Replay writes only into an empty schema, so it never mixes with existing rows."""


# --------------------------------------------------------------------------------------------
# Reading: a bare NATS connection that pulls one consumer and parses the protocol in bulk.
# --------------------------------------------------------------------------------------------


class RawReaderUnsupported(RuntimeError):
    """The server needs something the bare connection does not speak (TLS); use nats-py instead."""


# A header block in the plain form every Warden publisher writes: printable ASCII `Name: value`
# lines. Read from such a block, a header has the value nats-py's parser would give it
# (`Client._parse_header_lines`, which the live projector's messages went through).
_PLAIN_HEADERS = re.compile(rb"NATS/1\.0\r\n(?:[!-9;-~]+:[ -~]*\r\n)+\r\n")


class WireHeaders(Mapping[str, str]):
    """A message's headers, read from its plain header block only as far as they are asked for.

    The projector asks each message for two headers; parsing all of them into a dict, as nats-py
    does, costs more than the rest of reading the message. In a plain block (see
    `_PLAIN_HEADERS`) a name can only appear right after a line break and before a colon, and
    the last line with that name wins, as in nats-py's dict.
    """

    __slots__ = ("_block", "_parsed")

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._parsed: dict[str, str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        needle = _NEEDLES.get(key) or b"\r\n%s:" % key.encode()
        found = self._block.rfind(needle)
        if found < 0:
            return default
        start = found + len(needle)
        return self._block[start : self._block.index(b"\r\n", start)].strip().decode()

    def __getitem__(self, key: str) -> str:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return str(value)

    def __bool__(self) -> bool:
        return True  # a plain block has at least one header

    def _all(self) -> dict[str, str]:
        if self._parsed is None:
            self._parsed = NatsClient._parse_header_lines(self._block[10:])
        return self._parsed

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_MISSING = object()
_NEEDLES = {name: b"\r\n%s:" % name.encode() for name in (MSG_ID_HEADER, "traceparent")}


def parse_headers(block: bytes) -> Mapping[str, str] | None:
    """The headers of a message, as nats-py reports them (a mapping, or None when there are none)."""
    if _PLAIN_HEADERS.fullmatch(block):
        return WireHeaders(block)
    # Anything else (no headers, a status line, other characters) goes through nats-py's parser.
    return NatsClient._parse_header_lines(block[block.find(b"\r\n") + 2 :]) or None


# The usual frame: HMSG <subject> <sid> $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
# <consumer seq>.<timestamp ns>.<pending> <header bytes> <total bytes>. One match reads it all.
_STREAM_MESSAGE = re.compile(
    rb"HMSG ([^ \r\n]+) [0-9]+ \$JS\.ACK\.[^. ]+\.[^. ]+\.[0-9]+\."
    rb"([0-9]+)\.[0-9]+\.([0-9]+)\.([0-9]+) ([0-9]+) ([0-9]+)\r\n"
)


class _PullProtocol(asyncio.Protocol):
    """Parses what the server sends: stream messages are batched up for `PullReader`, the rest handled."""

    def __init__(self, stream: str, last_seq: int) -> None:
        self.stream = stream
        self.last_seq = last_seq
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.server_info: dict[str, Any] = {}
        self.batches: asyncio.Queue[list[StoredMessage] | BaseException | None] = asyncio.Queue()
        self.finished = False  # the last message of the range has arrived (or the connection failed)
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self._fail(exc or ConnectionError("NATS closed the connection during a replay"))

    def _fail(self, exc: BaseException) -> None:
        self.finished = True
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.batches.put_nowait(exc)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        size, pos = len(buffer), 0
        stream, last_seq = self.stream, self.last_seq
        messages: list[StoredMessage] = []
        complete = False
        while not complete and not self.finished:
            match = _STREAM_MESSAGE.match(buffer, pos)
            if match is None:  # anything but a stream message in the usual form
                frame = self._other_frame(buffer, pos)
                if frame is None:
                    break  # the frame has not all arrived yet
                pos, message, complete = frame
                if message is not None:
                    messages.append(message)
                continue
            subject, seq, stamp, pending, header_size, total_size = match.groups()
            start = match.end()
            stop = start + int(total_size)
            if stop + 2 > size:
                break  # the payload has not all arrived yet
            header_end = start + int(header_size)
            sequence = int(seq)
            if sequence <= last_seq:
                messages.append(
                    StoredMessage(
                        stream,
                        sequence,
                        subject.decode(),
                        parse_headers(buffer[start:header_end]),
                        buffer[header_end:stop],
                        # nats-py's arithmetic (Msg.Metadata), so stored_at is the same to the microsecond.
                        datetime.fromtimestamp(int(stamp) / 1_000_000_000.0, UTC),
                    )
                )
            # Past the range's end, or nothing more stored: done (what follows is never parsed).
            complete = sequence >= last_seq or pending == b"0"
            pos = stop + 2
        if messages:
            self.batches.put_nowait(messages)
        if complete:
            self.finished = True
            self.batches.put_nowait(None)
        self._buffer = buffer[pos:]

    def _other_frame(self, buffer: bytes, pos: int) -> tuple[int, StoredMessage | None, bool] | None:
        """Handle one frame at `pos` that is not a usual stream message: (next pos, message, done), or None."""
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        if not (buffer.startswith(b"HMSG ", pos) or buffer.startswith(b"MSG ", pos)):
            line = buffer[pos:end]
            if line == b"PING":
                assert self.transport is not None
                self.transport.write(b"PONG\r\n")
            elif line == b"PONG":
                if not self.ready.done():
                    self.ready.set_result(None)
            elif line.startswith(b"INFO "):
                self.server_info = json.loads(line[5:])
                if self.server_info.get("tls_required"):
                    self._fail(RawReaderUnsupported("the NATS server requires TLS"))
            elif line.startswith(b"-ERR"):
                self._fail(ConnectionError(f"NATS refused the replay's reader: {line.decode(errors='replace')}"))
            return end + 2, None, False
        # HMSG <subject> <sid> [reply] <header bytes> <total bytes>, or MSG <subject> <sid> [reply] <bytes>
        headed = buffer[pos] == 72  # "H"
        args = buffer[pos + (5 if headed else 4) : end].split(b" ")
        start = end + 2
        stop = start + int(args[-1])
        if stop + 2 > len(buffer):
            return None
        header_end = start + int(args[-2]) if headed else start
        reply = args[2] if len(args) == (5 if headed else 4) else b""
        if not reply.startswith(b"$JS.ACK."):
            self._status(buffer[start:header_end])
            return stop + 2, None, False
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>, or
        # with <domain>.<account hash> after ACK and a random token at the end.
        tokens = reply.split(b".")
        seq, stamp, pending = (tokens[5], tokens[7], tokens[8]) if len(tokens) == 9 else tokens[7:10]
        sequence = int(seq)
        message = None
        if sequence <= self.last_seq:
            message = StoredMessage(
                self.stream,
                sequence,
                args[0].decode(),
                parse_headers(buffer[start:header_end]) if headed else None,
                buffer[header_end:stop],
                datetime.fromtimestamp(int(stamp) / 1_000_000_000.0, UTC),
            )
        return stop + 2, message, sequence >= self.last_seq or pending == b"0"

    def _status(self, block: bytes) -> None:
        # A pull ends early only when something is wrong (the consumer went away, the server is
        # shutting down): 404/408 cannot happen to requests that ask only for stored messages.
        status = block[9:12]
        if status not in (b"100", b"404", b"408"):
            self._fail(RuntimeError(f"JetStream ended a replay pull: {block.decode(errors='replace').strip()}"))


def _pull_request(batch: int) -> tuple[int, bytes]:
    # No expiry: a request waits until served, and only stored messages are asked for.
    body = b'{"batch":%d}' % batch
    return len(body), body


class PullReader:
    """Every message of `stream` from `first_seq` to `last_seq`, in order, as lists of StoredMessage.

    An ephemeral pull consumer with no acknowledgements, read over a bare NATS connection:
    consuming the stream does not disturb it or any other consumer. nats-py (`nc`) creates and
    deletes the consumer; the bare connection only subscribes to an inbox and asks for batches.
    """

    def __init__(self, nc: NatsClient, stream: str, filter_subject: str, first_seq: int, last_seq: int) -> None:
        self.nc = nc
        self.stream = stream
        self.filter_subject = filter_subject
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.consumer = f"replay_{uuid.uuid4().hex}"
        self._protocol: _PullProtocol | None = None
        self._requested = 0
        self._consumed = 0

    async def __aenter__(self) -> Self:
        url = self.nc.connected_url
        if url is None or url.scheme not in ("nats", ""):
            raise RawReaderUnsupported(f"the bare reader speaks plain nats://, not {url and url.scheme}")
        await self.nc.jetstream().add_consumer(
            self.stream,
            ConsumerConfig(
                name=self.consumer,
                filter_subject=self.filter_subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.first_seq,
                # Unacknowledged and in memory: reading leaves no trace in the stream.
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                inactive_threshold=60.0,
            ),
        )
        try:
            await self._connect(url)
        except BaseException:
            await self._delete_consumer()
            raise
        return self

    async def _connect(self, url: ParseResult) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _PullProtocol(self.stream, self.last_seq), url.hostname or "127.0.0.1", url.port or 4222
        )
        self._protocol = protocol
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python3",
            "version": "warden-replay",
            "name": "warden-audit-replay",
        }
        if url.username and url.password:
            options.update(user=url.username, **{"pass": url.password})
        elif url.username:
            options["auth_token"] = url.username
        self._inbox = f"_INBOX.{uuid.uuid4().hex}".encode()
        self._write(b"CONNECT %s\r\nSUB %s 1\r\nPING\r\n" % (json.dumps(options).encode(), self._inbox))
        await asyncio.wait_for(protocol.ready, READ_TIMEOUT_SECONDS)
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}".encode()
        self._top_up()

    def _write(self, data: bytes) -> None:
        assert self._protocol is not None
        assert self._protocol.transport is not None
        self._protocol.transport.write(data)

    def _top_up(self) -> None:
        """Keep PULL_WINDOW messages requested beyond those handed out, but not many past the range.

        The consumer does not stop at `last_seq`, so requests are sized to the range; only if
        they are all served and the range is still open (deleted messages left gaps) is more asked.
        """
        size = self.last_seq - self.first_seq + 1
        while self._requested - self._consumed < PULL_WINDOW:
            batch = min(PULL_BATCH, size - self._requested)
            if batch <= 0:
                if self._requested > self._consumed:
                    return
                batch = PULL_BATCH
            self._write(b"PUB %s %s %d\r\n%s\r\n" % (self._next_subject, self._inbox, *_pull_request(batch)))
            self._requested += batch

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[StoredMessage]:
        assert self._protocol is not None
        batch = await asyncio.wait_for(self._protocol.batches.get(), READ_TIMEOUT_SECONDS)
        if batch is None:
            raise StopAsyncIteration
        if isinstance(batch, BaseException):
            raise batch
        self._consumed += len(batch)
        if not self._protocol.finished:
            self._top_up()
        return batch

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.finished = True
            self._protocol.transport.close()
        await self._delete_consumer()

    async def _delete_consumer(self) -> None:
        with contextlib.suppress(Exception):  # it expires on its own after inactive_threshold
            await self.nc.jetstream().delete_consumer(self.stream, self.consumer)


async def _nats_py_batches(
    nc: NatsClient, stream: str, filter_subject: str, first_seq: int, last_seq: int
) -> AsyncIterator[list[StoredMessage]]:
    """The portable, slower reader (nats-py batched fetch), for servers the bare reader cannot talk to."""
    subscription = await nc.jetstream().pull_subscribe(
        filter_subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    try:
        seen = first_seq - 1
        while seen < last_seq:
            messages = await subscription.fetch(PULL_BATCH, timeout=READ_TIMEOUT_SECONDS)
            yield [stored_message(m) for m in messages if m.metadata.sequence.stream <= last_seq]
            seen = messages[-1].metadata.sequence.stream
            if messages[-1].metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()


async def read_range(
    nc: NatsClient, stream: str, filter_subject: str, first_seq: int, last_seq: int
) -> AsyncIterator[list[StoredMessage]]:
    """Messages `first_seq`..`last_seq` of a stream, in order, in lists: bare reader if possible."""
    try:
        reader = PullReader(nc, stream, filter_subject, first_seq, last_seq)
        async with reader:
            async for batch in reader:
                yield batch
        return
    except RawReaderUnsupported as exc:
        log.info("replay reads through nats-py", reason=str(exc))
    async for batch in _nats_py_batches(nc, stream, filter_subject, first_seq, last_seq):
        yield batch


# --------------------------------------------------------------------------------------------
# Writing: COPY connections.
# --------------------------------------------------------------------------------------------

# asyncpg's timestamptz encoder (pgproto/codecs/datetime.pyx) normalises each value with
# astimezone(), which is slow for pydantic's TzInfo; for aware datetimes, plain arithmetic gives
# the same eight bytes in half the time, and a row has up to six of them.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INT64 = struct.Struct("!q")
_PG_INFINITY, _PG_NEGATIVE_INFINITY = 2**63 - 1, -(2**63)
# Instants asyncpg writes as infinity: datetime.max and datetime.min, in microseconds since 2000.
_INFINITY_MICROS, _NEGATIVE_INFINITY_MICROS = 252455615999999999, -63082281600000000


def encode_timestamptz(value: datetime) -> bytes:
    """The bytes asyncpg's binary timestamptz encoder writes for `value`."""
    try:
        micros = (value - _PG_EPOCH) // _MICROSECOND
    except TypeError:  # naive: asyncpg maps the extremes to ±infinity and reads the rest as local time
        if value == datetime.max:
            return _INT64.pack(_PG_INFINITY)
        if value == datetime.min:
            return _INT64.pack(_PG_NEGATIVE_INFINITY)
        micros = (value.astimezone(UTC) - _PG_EPOCH) // _MICROSECOND
    if micros == _INFINITY_MICROS:
        micros = _PG_INFINITY
    elif micros == _NEGATIVE_INFINITY_MICROS:
        micros = _PG_NEGATIVE_INFINITY
    return _INT64.pack(micros)


def decode_timestamptz(data: bytes) -> datetime:
    micros = _INT64.unpack(data)[0]
    if micros == _PG_INFINITY:
        return datetime.max
    if micros == _PG_NEGATIVE_INFINITY:
        return datetime.min
    return _PG_EPOCH + timedelta(microseconds=micros)


async def connect_for_copy(url: str) -> asyncpg.Connection:
    """A connection for COPYing projected rows (asyncpg's default codecs, faster timestamps)."""
    connection = await asyncpg.connect(url)
    await connection.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=encode_timestamptz,
        decoder=decode_timestamptz,
        format="binary",
    )
    return connection


# --------------------------------------------------------------------------------------------
# Projecting and writing one segment (in a worker process, or in this one for small replays).
# --------------------------------------------------------------------------------------------


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


@dataclass
class SegmentResult:
    """A segment's `events` rows are committed; its read-model rows are returned, merged, to apply in order."""

    segment: Segment
    applied: int = 0
    last_seq: int = 0
    rows: Rows = field(default_factory=Rows)
    cpu_seconds: float = 0.0


class _DryRun(Exception):
    """Raised to roll a savepoint back on purpose."""


async def _settle_refusals(subjects: Subjects, messages: Sequence[StoredMessage], refusals: asyncpg.Pool) -> Rows:
    """Project messages one by one, the way the live projector does when Postgres refuses a batch.

    Each message's rows are tried with the live projector's own statements, in a savepoint that
    is always rolled back; a message whose rows are refused becomes a raw `events` row with the
    database's reason, exactly as `AuditStore._write_one_by_one` records it.
    """
    rows = Rows()
    async with refusals.acquire() as connection, connection.transaction():
        for message in messages:
            single = project([message], subjects)
            try:
                async with connection.transaction():
                    await AuditStore._write(connection, single)
                    raise _DryRun
            except _DryRun:
                pass
            except asyncpg.DataError as exc:
                tenant = subjects.tenant_of(message.subject)
                single = Rows(events=[raw_event_row(message, tenant, f"postgres refused the row: {exc}")])
            rows.absorb(single)
    return rows


async def _write_chunks(
    connection: asyncpg.Connection,
    target: ReplayTarget,
    subjects: Subjects,
    chunks: asyncio.Queue[tuple[list[StoredMessage], Rows] | None],
    result: SegmentResult,
) -> None:
    """COPY each chunk's events rows, then fold its read-model rows into the segment's, in order."""
    refusals: asyncpg.Pool | None = None
    try:
        while (chunk := await chunks.get()) is not None:
            messages, rows = chunk
            try:
                if rows.has_refused_value:
                    raise asyncpg.DataError("a merged row hides a value postgres refuses")
                async with connection.transaction():  # a savepoint: a refused chunk leaves no rows
                    await connection.copy_records_to_table(
                        "events", records=rows.events, columns=EVENT_COLUMNS, schema_name=target.schema
                    )
            except asyncpg.DataError as exc:
                log.warning("replay chunk has a row postgres refuses; settling row by row", error=str(exc))
                # The live projector's pool settings, so its statements fail (or not) as they do live.
                refusals = refusals or await create_pool(target.database_url, schema=target.schema, size=1)
                rows = await _settle_refusals(subjects, messages, refusals)
                async with connection.transaction():
                    await connection.copy_records_to_table(
                        "events", records=rows.events, columns=EVENT_COLUMNS, schema_name=target.schema
                    )
            rows.events.clear()
            result.rows.absorb(rows)
            result.applied += len(messages)
            result.last_seq = messages[-1].seq
    finally:
        if refusals is not None:
            await refusals.close()


async def replay_segment_async(target: ReplayTarget, segment: Segment) -> SegmentResult:
    """Read, project and COPY one segment's events; return its merged read-model rows."""
    cpu_started = time.process_time()
    subjects = Subjects(target.subject_prefix)
    result = SegmentResult(segment)
    nc = await nats.connect(target.nats_url)
    connection = await connect_for_copy(target.database_url)
    # Projecting the next chunk overlaps writing this one; the queue bounds what waits in memory.
    chunks: asyncio.Queue[tuple[list[StoredMessage], Rows] | None] = asyncio.Queue(maxsize=2)
    try:
        async with connection.transaction():
            writer = asyncio.create_task(_write_chunks(connection, target, subjects, chunks, result))
            try:
                messages: list[StoredMessage] = []
                rows = Rows()
                async for batch in read_range(
                    nc, segment.stream, segment.filter_subject, segment.first_seq, segment.last_seq
                ):
                    project(batch, subjects, rows)
                    messages += batch
                    if len(messages) >= COPY_CHUNK:
                        await _put(chunks, (messages, rows), writer)
                        messages, rows = [], Rows()
                if messages:
                    await _put(chunks, (messages, rows), writer)
                await _put(chunks, None, writer)
                await writer
            finally:
                writer.cancel()
    finally:
        await connection.close()
        await nc.close()
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


def replay_segment(target: ReplayTarget, segment: Segment) -> SegmentResult:
    """Entry point of a worker process."""
    with cyclic_gc_paused():
        return asyncio.run(replay_segment_async(target, segment))


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


# --------------------------------------------------------------------------------------------
# The coordinator: segments out, read models applied in order, positions last.
# --------------------------------------------------------------------------------------------


class _ReadModelWriter:
    """Applies segments' read-model rows in stream order, leaving what the live upserts would leave.

    The target tables start empty, so:
    - decisions and rejected_commands keep the first row per key (ON CONFLICT DO NOTHING): a row
      whose key was written before is dropped here, and the rest are COPYed at once;
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

    async def apply(self, rows: Rows) -> None:
        decisions = [row for key, row in rows.decisions.items() if key not in self.decision_keys]
        self.decision_keys.update(rows.decisions)
        rejections = [row for key, row in rows.rejections.items() if key not in self.rejection_keys]
        self.rejection_keys.update(rows.rejections)
        await self._copy("decisions", DECISION_COLUMNS, decisions)
        await self._copy("rejected_commands", REJECTION_COLUMNS, rejections)
        for run in rows.runs.values():
            self.pending.merge_run(tuple(run))
        for tool_call in rows.tool_calls.values():
            self.pending.merge_tool_call(tuple(tool_call))
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


async def prepare_target(url: str, schema: str, subjects: Subjects, streams: list[str]) -> dict[str, list[str]]:
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
        await AuditStore(pool, subjects).ensure_schema(streams)
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
) -> ReplayReport:
    """Project every audited stream from sequence 1 into `schema` (created; must be empty).

    `workers` processes project segments of `segment_size` sequences in parallel; by default one
    per core for replays of at least PARALLEL_THRESHOLD messages, none (this process) below.
    """
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    url = database_url or settings.database_url
    filters = {streams.commands: subjects.all_commands, streams.events: subjects.all_events}
    target = ReplayTarget(settings.nats_url, url, schema, settings.subject_prefix)

    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        last_seqs = {stream: (await js.stream_info(stream)).state.last_seq for stream in filters}
    finally:
        await nc.close()
    total = sum(last_seqs.values())
    if workers is None:
        workers = default_workers() if total >= PARALLEL_THRESHOLD else 0
    size = segment_size or max(COPY_CHUNK, -(-total // max(1, workers * 6)))
    segments = _segments([(stream, filters[stream], last_seqs[stream]) for stream in filters], size)

    started = time.perf_counter()
    executor = _start_workers(workers) if workers and len(segments) > 1 else None
    try:
        with cyclic_gc_paused():
            deferred_indexes = await prepare_target(url, schema, subjects, list(filters))
            results = _run_segments(target, segments, executor)
            per_stream, worker_cpu = await _apply_in_order(url, schema, list(filters), results, deferred_indexes)
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - started
    report = ReplayReport(schema, sum(per_stream.values()), seconds, per_stream, worker_cpu)
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
        return _sequential(target, segments)
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(executor, replay_segment, target, segment) for segment in segments]
    return _in_order(futures)


async def _sequential(target: ReplayTarget, segments: Sequence[Segment]) -> AsyncIterator[SegmentResult]:
    for segment in segments:
        yield await replay_segment_async(target, segment)


async def _in_order(futures: Sequence[asyncio.Future[SegmentResult]]) -> AsyncIterator[SegmentResult]:
    try:
        for future in futures:
            yield await future
    finally:
        for future in futures:
            future.cancel()


async def _apply_in_order(
    url: str,
    schema: str,
    streams: list[str],
    results: AsyncIterator[SegmentResult],
    indexes: dict[str, list[str]],
) -> tuple[dict[str, int], float]:
    """Apply each segment's read-model rows in order, then record how far each stream was projected.

    Once every segment is in, the deferred `events` indexes are built (on other connections:
    the workers committed those rows) while the last read-model rows are written, and then
    their own indexes. Returns the messages applied per stream and the CPU seconds the
    segments took.
    """
    per_stream = dict.fromkeys(streams, 0)
    cpu_seconds = 0.0
    positions: dict[str, int] = {}
    connection = await connect_for_copy(url)
    try:
        async with connection.transaction():
            writer = _ReadModelWriter(connection, schema)
            async for result in results:
                await writer.apply(result.rows)
                per_stream[result.segment.stream] += result.applied
                cpu_seconds += result.cpu_seconds
                if result.applied:
                    positions[result.segment.stream] = result.last_seq
            await asyncio.gather(writer.flush(), _build_indexes(url, indexes["events"]))
            await connection.execute(_INDEX_MEMORY)
            for table in _LOADED_TABLES:
                for definition in indexes[table] if table != "events" else ():
                    await connection.execute(definition)
                await connection.execute(f'ALTER TABLE "{schema}".{table} RESET (autovacuum_enabled)')
            for stream, last_seq in positions.items():
                await connection.execute(
                    f'UPDATE "{schema}".projector_positions SET last_seq = $2 WHERE stream = $1', stream, last_seq
                )
    finally:
        await connection.close()
    return per_stream, cpu_seconds
