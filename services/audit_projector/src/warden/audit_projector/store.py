"""Postgres adapter for the audit projector: schema, stream positions and batched, idempotent writes."""

import asyncio
from collections.abc import Callable, Mapping, Sequence
from importlib import resources

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from warden.admission import CommandRules
from warden.audit_chain import ChainHeads, Head
from warden.audit_projector.projection import (
    DEAD_LETTER_COLUMNS,
    DECISION_COLUMNS,
    EVENT_COLUMNS,
    REJECTION_COLUMNS,
    RUN_COLUMNS,
    RUN_MERGE,
    TOOL_CALL_COLUMNS,
    TOOL_CALL_MERGE,
    Merge,
    Rows,
    StoredMessage,
    chained_events,
    project,
    raw_event_row,
    unstorable_dead_letter,
)
from warden.decoding import recordable_text

log = structlog.get_logger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy

# Taken by whichever projector process is active; a second one waits for it (hot standby), so
# two projectors never interleave batches of the same stream.
PROJECTOR_LOCK_KEY = 0x5741_5244_454E  # "WARDEN"


# Every table schema.sql creates. The projector only appends to `events` and `dead_letters`; it
# keeps the others (the read model and its own bookkeeping) up to date.
AUDIT_TABLES = (
    "events",
    "projector_positions",
    "projector_lease",
    "runs",
    "rejected_commands",
    "stream_gaps",
    "dead_letters",
    "decisions",
    "tool_calls",
)
APPEND_ONLY_TABLES = ("events", "dead_letters")
READ_MODEL_TABLES = tuple(table for table in AUDIT_TABLES if table not in APPEND_ONLY_TABLES)


def _placeholders(count: int) -> str:
    return ", ".join(f"${i}" for i in range(1, count + 1))


INSERT_EVENT = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({_placeholders(len(EVENT_COLUMNS))}) "
    "ON CONFLICT (stream, stream_seq) DO NOTHING"
)


def on_conflict_merge(table: str, merge: Mapping[str, Merge]) -> str:
    """The ON CONFLICT clause that merges a row into `table` by its columns' declared rules
    (projection.Merge): the same rules `projection.Rows` applies in memory."""
    key = ", ".join(column for column, kind in merge.items() if kind is Merge.KEY)
    sets = []
    for column, kind in merge.items():
        old, new = f"{table}.{column}", f"EXCLUDED.{column}"
        match kind:
            case Merge.RANKED:
                rank = f"{column}_rank"
                sets.append(f"{column} = CASE WHEN EXCLUDED.{rank} > {table}.{rank} THEN {new} ELSE {old} END")
            case Merge.HIGHEST:
                sets.append(f"{column} = GREATEST({old}, {new})")
            case Merge.ADD:
                sets.append(f"{column} = {old} + {new}")
            case Merge.FIRST:
                sets.append(f"{column} = COALESCE({old}, {new})")
    return f"ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(sets)


MERGE_RUN_ON_CONFLICT = on_conflict_merge("runs", RUN_MERGE)
MERGE_RUN = (
    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({_placeholders(len(RUN_COLUMNS))}) {MERGE_RUN_ON_CONFLICT}"
)
INSERT_REJECTION = (
    f"INSERT INTO rejected_commands ({', '.join(REJECTION_COLUMNS)}) "
    f"VALUES ({_placeholders(len(REJECTION_COLUMNS))}) ON CONFLICT DO NOTHING"
)

INSERT_DECISION = (
    f"INSERT INTO decisions ({', '.join(DECISION_COLUMNS)}) VALUES ({_placeholders(len(DECISION_COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)
MERGE_TOOL_CALL_ON_CONFLICT = on_conflict_merge("tool_calls", TOOL_CALL_MERGE)
MERGE_TOOL_CALL = (
    f"INSERT INTO tool_calls ({', '.join(TOOL_CALL_COLUMNS)}) VALUES ({_placeholders(len(TOOL_CALL_COLUMNS))}) "
    + MERGE_TOOL_CALL_ON_CONFLICT
)

INSERT_DEAD_LETTER = (
    f"INSERT INTO dead_letters ({', '.join(DEAD_LETTER_COLUMNS)}) VALUES ({_placeholders(len(DEAD_LETTER_COLUMNS))}) "
    "ON CONFLICT DO NOTHING"
)
# Where each chain of a stream ends: the row with the highest index per tenant (events_by_chain).
CHAIN_HEADS = (
    "SELECT DISTINCT ON (tenant) tenant, chain_index, chain_hash FROM events "
    "WHERE stream = $1 AND chain_index IS NOT NULL ORDER BY tenant, chain_index DESC"
)
INSERT_GAP = "INSERT INTO stream_gaps (stream, first_seq, last_seq) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"

# Postgres refusing what a batch holds (a value, a constraint, a size limit), rather than being
# unable to take anything: the batch is then written message by message (see AuditStore.apply).
# ValueError is asyncpg refusing to encode an argument, before the statement is sent.
CONTENT_REFUSALS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
    ValueError,
)

# Failures worth waiting out: the server is away or busy, or our transaction lost a race.
RETRYABLE_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TransactionRollbackError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
)


def schema_sql() -> str:
    return resources.files("warden.audit_projector").joinpath("schema.sql").read_text()


async def _init_connection(connection: asyncpg.Connection) -> None:
    # jsonb travels as text we already serialised (canonical JSON), so no codec round trip.
    await connection.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog", format="text")


async def create_pool(database_url: str, schema: str | None = None, size: int = 4) -> asyncpg.Pool:
    """A pool whose connections see `schema` first, so replays can build tables beside the live ones."""
    settings = {"search_path": schema} if schema else {}
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=size, init=_init_connection, server_settings=settings
    )
    assert pool is not None
    return pool


# How long closing connections may take at shutdown before they are cut: a connection stuck in a
# transaction must not keep a stopping projector alive (and its supervisor from restarting it).
CLOSE_TIMEOUT_SECONDS = 5.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close the pool gracefully if it can be done promptly, else terminate its connections."""
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("postgres connections did not close in time; terminating them", after_s=CLOSE_TIMEOUT_SECONDS)
        pool.terminate()


class SchemaNotInstalled(RuntimeError):
    """The database has not been installed for Warden (see warden.audit_projector.install)."""


class LeadershipLost(RuntimeError):
    """Another projector became active: this one must stop writing at once."""


class NotContiguous(RuntimeError):
    """A batch does not start right after the stored position: applying it would leave a hole."""


class AuditStore:
    """Writes projected rows and the stream position in one transaction per batch.

    Locks are always taken in one order: the lease row first (shared by ordinary batches), then
    the stream's position, then read-model rows in key order, table by table. A batch written
    message by message cannot keep that order, so it takes the lease exclusively and runs alone.
    """

    def __init__(self, pool: asyncpg.Pool, rules: CommandRules) -> None:
        self.pool = pool
        self.rules = rules
        self.epoch: int | None = None
        # Each stream's chain heads as committed: read from the table on a stream's first batch,
        # replaced only once a batch commits, and forgotten when one fails (its outcome unknown).
        self.heads: dict[str, ChainHeads] = {}
        self.chained: Callable[[str, str, int, bytes], None] | None = None
        self._lock_connection: asyncpg.Connection | None = None

    async def become_active(self, database_url: str) -> None:
        """Wait until no other projector is active, then fence out any that still thinks it is."""
        self._lock_connection = await asyncpg.connect(database_url)
        await self._lock_connection.execute("SELECT pg_advisory_lock($1)", PROJECTOR_LOCK_KEY)
        self.epoch = await self.pool.fetchval("UPDATE projector_lease SET epoch = epoch + 1 RETURNING epoch")
        log.info("projector active", epoch=self.epoch)

    async def release(self) -> None:
        if self._lock_connection is not None:
            try:
                await self._lock_connection.close(timeout=CLOSE_TIMEOUT_SECONDS)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._lock_connection.terminate()
            self._lock_connection = None

    async def ensure_schema(self, streams: Sequence[str]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            # Serialise concurrent start-ups: CREATE ... IF NOT EXISTS is not safe under a race.
            await connection.execute("SELECT pg_advisory_xact_lock($1)", PROJECTOR_LOCK_KEY + 1)
            await connection.execute(schema_sql())
            await connection.executemany(
                "INSERT INTO projector_positions (stream) VALUES ($1) ON CONFLICT DO NOTHING",
                [(stream,) for stream in streams],
            )

    async def check_schema(self, streams: Sequence[str]) -> None:
        """Check the tables are installed (the projector may not create them), and start a position
        for each stream that has none; `SchemaNotInstalled` if they are not there."""
        missing = await self.pool.fetchval(
            "SELECT array_agg(name) FROM unnest($1::text[]) AS name WHERE to_regclass(name) IS NULL",
            list(AUDIT_TABLES),
        )
        if missing:
            raise SchemaNotInstalled(
                f"the audit tables are not installed ({', '.join(missing)} missing): "
                "`warden up` installs them, or `warden database install` for a server of your own"
            )
        await self.pool.executemany(
            "INSERT INTO projector_positions (stream) VALUES ($1) ON CONFLICT DO NOTHING",
            [(stream,) for stream in streams],
        )

    async def positions(self) -> dict[str, int]:
        records = await self.pool.fetch("SELECT stream, last_seq FROM projector_positions")
        return {record["stream"]: record["last_seq"] for record in records}

    async def apply(self, stream: str, messages: Sequence[StoredMessage]) -> int:
        """Project the messages not yet applied; return how many were new. Safe to call again.

        The new messages must continue the stored position without a hole (`NotContiguous`
        otherwise). When Postgres refuses something in the batch, it is written again message
        by message: a message whose rows are refused is stored raw with the reason, and one
        that cannot be stored even raw becomes a dead letter (stream, sequence, reason), so one
        message never stops the stream.
        """
        try:
            try:
                return await self._apply(stream, messages, one_by_one=False)
            except CONTENT_REFUSALS as exc:
                log.warning(
                    "batch has a row postgres refuses; writing it message by message", stream=stream, error=str(exc)
                )
            return await self._apply(stream, messages, one_by_one=True)
        except BaseException:
            self.heads.pop(stream, None)
            raise

    async def record_gap(self, stream: str, first_seq: int, last_seq: int) -> None:
        """Write down that `first_seq`..`last_seq` are missing from the stream, and move the position past them."""
        async with self.pool.acquire() as connection, connection.transaction():
            position = await self._lock_position(connection, stream, exclusive=False)
            if position != first_seq - 1:
                raise NotContiguous(f"{stream}: a gap from {first_seq} does not follow the stored position {position}")
            await connection.execute(INSERT_GAP, stream, first_seq, last_seq)
            await connection.execute("UPDATE projector_positions SET last_seq = $2 WHERE stream = $1", stream, last_seq)

    async def _lock_position(self, connection: Connection, stream: str, *, exclusive: bool) -> int:
        """Take the lease (fencing out a deposed projector) and lock the stream's position; return it.

        The lease is the first lock every transaction takes: shared by ordinary batches, so a
        takeover's epoch bump waits for this batch and then fences the next; exclusive for a batch
        written message by message, which then runs alone (see the class's docstring).
        """
        lock = "FOR UPDATE" if exclusive else "FOR SHARE"
        epoch = await connection.fetchval(f"SELECT epoch FROM projector_lease WHERE id = 1 {lock}")
        if self.epoch is not None and epoch != self.epoch:
            raise LeadershipLost(f"projector epoch is now {epoch}, this process holds {self.epoch}")
        last_seq = await connection.fetchval(
            "SELECT last_seq FROM projector_positions WHERE stream = $1 FOR UPDATE", stream
        )
        if last_seq is None:
            raise RuntimeError(f"no projector position for stream {stream!r}: run ensure_schema first")
        return int(last_seq)

    async def _apply(self, stream: str, messages: Sequence[StoredMessage], *, one_by_one: bool) -> int:
        async with self.pool.acquire() as connection, connection.transaction():
            last_seq = await self._lock_position(connection, stream, exclusive=one_by_one)
            fresh = [message for message in messages if message.seq > last_seq]
            if not fresh:
                return 0
            expected = range(last_seq + 1, last_seq + 1 + len(fresh))
            if [message.seq for message in fresh] != list(expected):
                raise NotContiguous(
                    f"{stream}: batch {fresh[0].seq}..{fresh[-1].seq} ({len(fresh)} messages) does not continue "
                    f"the stored position {last_seq} without a hole"
                )
            heads = self.heads.get(stream)
            if heads is None:
                heads = await self._read_heads(connection, stream)
            extended = heads.fork()
            if one_by_one:
                await self._write_one_by_one(connection, fresh, extended)
            else:
                rows = project(fresh, self.rules)
                rows.events = chained_events(extended, rows.events)
                await self._write(connection, rows)
            await connection.execute(
                "UPDATE projector_positions SET last_seq = $2 WHERE stream = $1", stream, fresh[-1].seq
            )
        self.heads[stream] = extended
        if self.chained is not None:
            for (_, tenant), head in extended.heads.items():
                if heads.head((stream, tenant)) != head:
                    self.chained(stream, tenant, head.last_index, head.hash)
        return len(fresh)

    @staticmethod
    async def _read_heads(connection: Connection, stream: str) -> ChainHeads:
        records = await connection.fetch(CHAIN_HEADS, stream)
        return ChainHeads({(stream, r["tenant"]): Head(r["chain_index"], bytes(r["chain_hash"])) for r in records})

    @staticmethod
    async def _write(connection: Connection, rows: Rows) -> None:
        if rows.events:
            await connection.executemany(INSERT_EVENT, rows.events)
        # The read models arrive merged per key (one upsert each), in key order: one lock order
        # for every batch, so two streams' batches cannot deadlock on runs or tool_calls rows.
        if rows.runs:
            await connection.executemany(MERGE_RUN, rows.run_rows())
        if rows.rejections:
            await connection.executemany(INSERT_REJECTION, list(rows.rejections.values()))
        if rows.decisions:
            await connection.executemany(INSERT_DECISION, list(rows.decisions.values()))
        if rows.tool_calls:
            await connection.executemany(MERGE_TOOL_CALL, rows.tool_call_rows())
        if rows.dead_letters:
            await connection.executemany(INSERT_DEAD_LETTER, sorted(rows.dead_letters.values()))

    async def _write_one_by_one(
        self, connection: Connection, messages: Sequence[StoredMessage], heads: ChainHeads
    ) -> None:
        """Write each message in a savepoint; `heads` moves on only for the rows that are stored."""
        for message in messages:
            trial = heads.fork()
            try:
                async with connection.transaction():
                    rows = project([message], self.rules)
                    rows.events = chained_events(trial, rows.events)
                    await self._write(connection, rows)
                heads.adopt(trial)
                continue
            except CONTENT_REFUSALS as exc:
                refusal = f"postgres refused the row: {exc}"
            log.warning("storing a message raw", stream=message.stream, stream_seq=message.seq, reason=refusal)
            trial = heads.fork()
            try:
                async with connection.transaction():
                    raw = chained_events(trial, [raw_event_row(message, self.rules.subjects, refusal)])
                    await connection.executemany(INSERT_EVENT, raw)
                heads.adopt(trial)
                continue
            except CONTENT_REFUSALS as exc:
                reason = recordable_text(f"{refusal}; stored raw, refused again: {exc}", 2000)
            log.error("dead-lettering a message", stream=message.stream, stream_seq=message.seq, reason=reason)
            await connection.execute(INSERT_DEAD_LETTER, *unstorable_dead_letter(message, reason))
