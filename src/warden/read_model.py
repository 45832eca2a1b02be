"""Queries on the audit tables the projector writes: the one place the CLI, the demo and the
timeline read them (and where a UI would).

Each query returns named records, so a caller never depends on column order or on SQL.
"""

import heapq
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

Database = asyncpg.Pool | asyncpg.Connection
# Statuses a run ends in: after one of these, the run's rows change no more.
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "denied")


@dataclass(frozen=True)
class RunSummary:
    """One row of `warden runs`: a run as the `runs` table has it."""

    run_id: str
    tenant: str
    agent: str | None
    status: str
    submitted_by: str | None
    model_turns: int
    tool_calls: int
    submitted_at: datetime | None
    tokens: int = 0  # input and output, of every model turn
    cost_usd: Decimal = Decimal(0)


@dataclass(frozen=True)
class RejectedCommand:
    """A command the gate refused, kept in the commands stream at `command_stream_seq`."""

    command_stream_seq: int
    tenant: str
    code: str
    reason: str
    rejected_at: datetime | None


@dataclass(frozen=True)
class RunEvent:
    """One stored message of a run, as the `events` table holds it."""

    stream: str
    stream_seq: int
    stored_at: datetime  # when JetStream stored it: the server's clock
    sent_at: datetime  # the envelope's `time`: what the sender claimed
    type: str
    actor: str
    data: dict[str, Any]


async def recent_runs(db: Database, tenant: str | None, limit: int) -> list[RunSummary]:
    """The latest runs, newest first; of one tenant, or of all when `tenant` is None."""
    rows = await db.fetch(
        "SELECT run_id, tenant, agent, status, submitted_by, steps, tool_calls, submitted_at, "
        "input_tokens + output_tokens AS tokens, cost_nanousd::numeric / 1000000000 AS cost_usd FROM runs "
        "WHERE $1::text IS NULL OR tenant = $1 ORDER BY submitted_at DESC NULLS LAST LIMIT $2",
        tenant,
        limit,
    )
    return [
        RunSummary(
            run_id=row["run_id"],
            tenant=row["tenant"],
            agent=row["agent"],
            status=row["status"],
            submitted_by=row["submitted_by"],
            model_turns=row["steps"],  # the table's `steps` are the model turns: tool calls are counted apart
            tool_calls=row["tool_calls"],
            submitted_at=row["submitted_at"],
            tokens=row["tokens"],
            cost_usd=row["cost_usd"],
        )
        for row in rows
    ]


@dataclass(frozen=True)
class Usage:
    """What a tenant's runs of one agent consumed (the `usage_by_agent` view)."""

    tenant: str
    agent: str
    runs: int
    model_calls: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


async def usage_by_agent(db: Database, tenant: str | None) -> list[Usage]:
    """Usage summed per tenant and agent; of one tenant, or of all when `tenant` is None."""
    rows = await db.fetch(
        "SELECT tenant, agent, runs, model_calls, tool_calls, input_tokens, output_tokens, cost_usd "
        "FROM usage_by_agent WHERE $1::text IS NULL OR tenant = $1 ORDER BY tenant, agent",
        tenant,
    )
    return [Usage(**dict(row)) for row in rows]


async def recent_rejections(db: Database, tenant: str | None, limit: int) -> list[RejectedCommand]:
    """The latest rejected commands, newest first; of one tenant, or of all when `tenant` is None."""
    rows = await db.fetch(
        "SELECT command_stream_seq, tenant, code, reason, rejected_at FROM rejected_commands "
        "WHERE $1::text IS NULL OR tenant = $1 ORDER BY command_stream_seq DESC LIMIT $2",
        tenant,
        limit,
    )
    return [RejectedCommand(**dict(row)) for row in rows]


async def tenant_of_run(db: Database, run_id: str) -> str | None:
    """The tenant a run belongs to, or None when the tables do not have it (yet)."""
    tenant: str | None = await db.fetchval("SELECT tenant FROM runs WHERE run_id = $1", run_id)
    return tenant


async def final_status(db: Database, run_id: str) -> str | None:
    """How the run ended (one of FINAL_STATUSES), or None while it has not."""
    status: str | None = await db.fetchval(
        "SELECT status FROM runs WHERE run_id = $1 AND status = ANY($2::text[])", run_id, list(FINAL_STATUSES)
    )
    return status


async def run_events(db: Database, tenant: str, run_id: str) -> list[RunEvent]:
    """A run's stored messages (commands and events) in the order the server stored them."""
    rows = await db.fetch(
        "SELECT stream, stream_seq, stored_at, type, actor, time, payload FROM events "
        "WHERE tenant = $1 AND entity_id = $2 AND type IS NOT NULL ORDER BY stream, stream_seq",
        tenant,
        run_id,
    )
    return [
        RunEvent(
            stream=row["stream"],
            stream_seq=row["stream_seq"],
            stored_at=row["stored_at"],
            sent_at=row["time"],
            type=row["type"],
            actor=row["actor"],
            data=json.loads(row["payload"]) if row["payload"] else {},
        )
        for row in server_order(rows)
    ]


def server_order(rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """A run's rows, sorted by stream and sequence, in the order the server stored them.

    Within a stream that is stream sequence, the server's own order. A run's rows come from two
    streams (commands and events), whose sequences cannot be compared, so the streams are
    merged by the time JetStream stored each message, never reordering either. The envelope's
    `time` is what the sender claimed, and a sender can backdate it, so it orders nothing.
    """
    by_stream = [list(group) for _, group in itertools.groupby(rows, key=lambda row: row["stream"])]
    return list(heapq.merge(*by_stream, key=lambda row: row["stored_at"]))


@dataclass(frozen=True)
class DeadLetter:
    """A message a consumer gave up on (`warden dead-letters`), with its bytes when they were kept."""

    stream: str
    stream_seq: int
    consumer: str
    reason: str
    deliveries: int | None
    recorded_at: datetime | None  # when the consumer gave up; None for messages the projector could not store
    subject: str | None
    raw: bytes | None
    raw_note: str | None  # why `raw` is None


async def dead_letters(db: Database, stream: str | None, limit: int) -> list[DeadLetter]:
    """The latest dead letters, newest first; of one stream, or of all when `stream` is None."""
    rows = await db.fetch(
        "SELECT stream, stream_seq, consumer, reason, deliveries, recorded_at, subject, raw, raw_note "
        "FROM dead_letters WHERE $1::text IS NULL OR stream = $1 "
        "ORDER BY recorded_at DESC NULLS LAST, stream, stream_seq DESC, consumer LIMIT $2",
        stream,
        limit,
    )
    return [DeadLetter(**dict(row)) for row in rows]
