"""`warden audit verify`: every audit chain recomputed from Postgres, held against the checkpoints and the streams.

Three sources, each checked against the others:

- the `events` table, read in stream order, every row's content hashed and linked again
  (`audit_chain.ChainVerifier`): changed, missing, inserted and reordered rows;
- the checkpoints stream: every checkpoint's signature checked with the projector's public keys,
  each chain's checkpoints in increasing order, the chain's hash at each checkpointed index equal
  to the signed head (a rewritten chain), no checkpoint past the chain's end (rows cut off);
- the audited streams themselves (unless skipped): every stored message projected again with the
  projector's own code must give its row's content, every row must have its message, and
  messages whose rows are missing at a chain's end show rows cut off after the last checkpoint.
"""

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from nats.aio.client import Client as NatsClient
from nats.js.errors import NotFoundError

from warden.admission import CommandRules
from warden.audit_chain import (
    CONTENT_COLUMNS,
    BadCheckpoint,
    ChainRow,
    ChainSummary,
    ChainVerifier,
    Checkpoint,
    Finding,
    InsertedRow,
    MissingRows,
    RowsCutOff,
    StreamMismatch,
    content_hash,
)
from warden.audit_projector.projection import PROJECTOR_CONSUMER, project, raw_event_row
from warden.audit_projector.stream_reader import read_range
from warden.identity import connect_options
from warden.permissions import Role
from warden.settings import Settings
from warden.signing import TrustedKeys
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import connect

# The reason the projector gives a row it stored raw because Postgres refused its columns: such a
# row is compared with the raw row made of its message (see store.AuditStore._write_one_by_one).
_REFUSED = "postgres refused the row"

_SELECT_ROWS = (
    "SELECT "
    + ", ".join("payload::text" if column == "payload" else column for column in CONTENT_COLUMNS)
    + ", chain_index, chain_hash FROM events WHERE stream = $1 ORDER BY stream_seq"
)

Progress = Callable[[str], None]


@dataclass
class VerifyReport:
    """What the verifier checked and what it found."""

    findings: list[Finding] = field(default_factory=list)
    chains: list[ChainSummary] = field(default_factory=list)
    rows: int = 0
    messages: int = 0
    checkpoints: int = 0
    stream_checked: bool = True
    seconds: float = 0.0

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def unanchored(self) -> int:
        return sum(chain.unanchored for chain in self.chains)

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "rows": self.rows,
            "messages": self.messages if self.stream_checked else None,
            "checkpoints": self.checkpoints,
            "unanchored_rows": self.unanchored,
            "seconds": round(self.seconds, 3),
            "findings": [finding.as_dict() for finding in self.findings],
            "chains": [
                {
                    "stream": chain.stream,
                    "tenant": chain.tenant,
                    "rows": chain.rows,
                    "last_index": chain.last_index,
                    "last_checkpoint": chain.last_checkpoint,
                    "unanchored": chain.unanchored,
                    "unchained": chain.unchained,
                }
                for chain in self.chains
            ],
        }


@dataclass
class _StoredRows:
    """One stream's rows as the table holds them, for the comparison with the stream."""

    content: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # seq -> (tenant, content hash)
    refused: dict[int, str] = field(default_factory=dict)  # seq -> reason, for rows stored raw on refusal
    last_seq: dict[str, int] = field(default_factory=dict)  # tenant -> the chain's last row's sequence
    last_index: dict[str, int] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)  # seq -> tenant, for messages without a row


async def verify(
    settings: Settings,
    database: asyncpg.Connection,
    *,
    skip_stream: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check the audit in `database` (a read-only login will do) against the checkpoints and the streams."""
    started = time.perf_counter()
    say = progress or (lambda _: None)
    subjects = Subjects(settings.subject_prefix)
    names = StreamNames.for_prefix(settings.subject_prefix)
    filters = {names.commands: subjects.all_commands, names.events: subjects.all_events}
    report = VerifyReport(stream_checked=not skip_stream)
    seed_file = settings.seed_file_for(Role.AUDIT_PROJECTOR)
    nc = await connect(settings.nats_url, **connect_options(seed_file))
    try:
        checkpoints = await _read_checkpoints(
            nc, settings, names=names, subjects=subjects, report=report, seed_file=seed_file
        )
        say(f"{report.checkpoints} checkpoints read")
        verifier = ChainVerifier(checkpoints)
        streams = list(filters) + [
            stream
            for stream in await database.fetchval("SELECT coalesce(array_agg(stream), '{}') FROM projector_positions")
            if stream not in filters
        ]
        stored: dict[str, _StoredRows] = {}
        for stream in streams:
            stored[stream] = await _check_rows(database, stream, verifier, report, say)
        report.chains = verifier.finish()
        report.findings += verifier.findings
        if not skip_stream:
            dead = {
                (r["stream"], r["stream_seq"])
                for r in await database.fetch(
                    "SELECT stream, stream_seq FROM dead_letters WHERE consumer = $1", PROJECTOR_CONSUMER
                )
            }
            rules = CommandRules(subjects, settings.max_command_bytes)
            for stream, filter_subject in filters.items():
                await _check_stream(
                    nc,
                    stream,
                    filter_subject,
                    stored=stored[stream],
                    dead=dead,
                    rules=rules,
                    report=report,
                    seed_file=seed_file,
                    say=say,
                )
            _cut_off_or_missing(report, stored)
    finally:
        await nc.close()
    report.seconds = time.perf_counter() - started
    return report


async def _read_checkpoints(
    nc: NatsClient,
    settings: Settings,
    *,
    names: StreamNames,
    subjects: Subjects,
    report: VerifyReport,
    seed_file: Any,
) -> list[Checkpoint]:
    """Every checkpoint whose signature, subject and order hold; the others become findings."""
    try:
        last_seq = (await nc.jetstream().stream_info(names.checkpoints)).state.last_seq
    except NotFoundError:
        return []
    if not last_seq:
        return []
    trusted = TrustedKeys(TrustedKeys.read(settings.checkpoint_keys_path(), "checkpoint"), "checkpoint")
    accepted: list[Checkpoint] = []
    latest: dict[tuple[str, str], int] = {}
    async for batch in read_range(nc, names.checkpoints, subjects.all_checkpoints, 1, last_seq, seed_file=seed_file):
        for message in batch:
            report.checkpoints += 1
            try:
                checkpoint = Checkpoint.from_json(message.data)
            except (ValueError, KeyError, TypeError) as exc:
                tenant = message.subject.split(".")[2] if message.subject.count(".") >= 3 else "?"
                report.findings.append(BadCheckpoint("?", tenant, 0, f"unreadable ({exc}) at {message.seq}"))
                continue
            reason = trusted.refusal_of(checkpoint.signed_bytes(), checkpoint.signing_key, checkpoint.signature)
            if reason is None and message.subject != subjects.checkpoint(checkpoint.tenant, checkpoint.stream):
                reason = f"signed for another chain than its subject {message.subject}"
            if reason is None and checkpoint.index <= latest.get(checkpoint.chain, 0):
                reason = f"index {checkpoint.index} does not follow the chain's previous checkpoint"
            if reason is not None:
                report.findings.append(BadCheckpoint(checkpoint.stream, checkpoint.tenant, checkpoint.index, reason))
                continue
            latest[checkpoint.chain] = checkpoint.index
            accepted.append(checkpoint)
    return accepted


async def _rows(database: asyncpg.Connection, stream: str) -> AsyncIterator[asyncpg.Record]:
    async with database.transaction(readonly=True):
        async for record in database.cursor(_SELECT_ROWS, stream, prefetch=5000):
            yield record


async def _check_rows(
    database: asyncpg.Connection, stream: str, verifier: ChainVerifier, report: VerifyReport, say: Progress
) -> _StoredRows:
    stored = _StoredRows()
    shown = time.monotonic()
    async for record in _rows(database, stream):
        seq, tenant = record["stream_seq"], record["tenant"]
        digest = content_hash(tuple(record))
        index = record["chain_index"]
        verifier.add(ChainRow(stream, seq, tenant, index, record["chain_hash"], digest))
        stored.content[seq] = (tenant, digest)
        if (record["invalid_reason"] or "").startswith(_REFUSED):
            stored.refused[seq] = record["invalid_reason"]
        if index is not None and index > stored.last_index.get(tenant, 0):
            stored.last_index[tenant], stored.last_seq[tenant] = index, seq
        report.rows += 1
        if time.monotonic() - shown > 1.0:
            say(f"{stream}: {report.rows} rows checked")
            shown = time.monotonic()
    return stored


async def _check_stream(
    nc: NatsClient,
    stream: str,
    filter_subject: str,
    *,
    stored: _StoredRows,
    dead: set[tuple[str, int]],
    rules: CommandRules,
    report: VerifyReport,
    seed_file: Any,
    say: Progress,
) -> None:
    """Hold each stored message against its row; what is left over on either side is noted in `stored`."""
    last_seq = (await nc.jetstream().stream_info(stream)).state.last_seq
    shown = time.monotonic()
    async for batch in read_range(nc, stream, filter_subject, 1, last_seq, seed_file=seed_file):
        for message, projected in zip(batch, project(batch, rules).events, strict=True):
            report.messages += 1
            held = stored.content.pop(message.seq, None)
            if held is None:
                if (stream, message.seq) not in dead:
                    stored.missing[message.seq] = projected.tenant
                continue
            refusal = stored.refused.get(message.seq)
            row = projected if refusal is None else raw_event_row(message, rules.subjects, refusal)
            if content_hash(row) != held[1]:
                report.findings.append(
                    StreamMismatch(stream, held[0], message.seq, "the row is not what the stream stored")
                )
        if time.monotonic() - shown > 1.0:
            say(f"{stream}: {report.messages} messages compared")
            shown = time.monotonic()
    # What is left in `stored.content` has no message; `stored.missing` has no row (see _cut_off_or_missing).


def _cut_off_or_missing(report: VerifyReport, stored: dict[str, _StoredRows]) -> None:
    """Messages without a row at a chain's end: rows cut off; elsewhere: missing; rows without a message: inserted."""
    reported = {(f.stream, f.tenant) for f in report.findings if isinstance(f, MissingRows)}
    cut = {(f.stream, f.tenant) for f in report.findings if isinstance(f, RowsCutOff)}
    inserted = {(f.stream, f.stream_seq) for f in report.findings if isinstance(f, InsertedRow)}
    for stream, rows in stored.items():
        tails: dict[str, int] = {}
        for seq, tenant in sorted(rows.missing.items()):
            if seq > rows.last_seq.get(tenant, 0):
                tails[tenant] = tails.get(tenant, 0) + 1
            elif (stream, tenant) not in reported:
                report.findings.append(StreamMismatch(stream, tenant, seq, "the stored message has no row"))
        for tenant, count in sorted(tails.items()):
            if (stream, tenant) not in cut:  # a checkpoint past the end has said so already
                last = rows.last_index.get(tenant, 0)
                report.findings.append(RowsCutOff(stream, tenant, last, last + count, "stream"))
        for seq, (tenant, _) in sorted(rows.content.items()):
            if (stream, seq) not in inserted:
                report.findings.append(InsertedRow(stream, tenant, seq, "the stream holds no such message"))
