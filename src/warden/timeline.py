"""Read a run's story back from the audit tables: who asked, each decision, each step, the result."""

import heapq
import itertools
import json
from collections.abc import Sequence
from typing import Any

import asyncpg


def server_order(rows: Sequence[asyncpg.Record]) -> list[asyncpg.Record]:
    """A run's rows in the order the server stored them.

    Within a stream that is stream sequence, the server's own order. A run's rows come from two
    streams (commands and events), whose sequences cannot be compared, so the streams are
    merged by the time JetStream stored each message, never reordering either. The envelope's
    `time` is what the sender claimed, and a sender can backdate it, so it orders nothing.
    """
    by_stream = [list(group) for _, group in itertools.groupby(rows, key=lambda row: row["stream"])]
    return list(heapq.merge(*by_stream, key=lambda row: row["stored_at"]))


async def run_timeline(db: asyncpg.Pool | asyncpg.Connection, tenant: str, run_id: str) -> list[str]:
    """Lines describing the run, in the order the server stored its messages, from the `events` table.

    Each line starts with the time the server stored the message, then the time the sender
    claimed (with its date when that is another day).
    """
    rows = await db.fetch(
        "SELECT stream, stream_seq, stored_at, type, actor, time, payload FROM events "
        "WHERE tenant = $1 AND subject = $2 AND type IS NOT NULL ORDER BY stream, stream_seq",
        tenant,
        run_id,
    )
    lines = []
    for row in server_order(rows):
        data: dict[str, Any] = json.loads(row["payload"]) if row["payload"] else {}
        stored, claimed = row["stored_at"], row["time"]
        claimed_format = "%H:%M:%S.%f" if claimed.date() == stored.date() else "%Y-%m-%d %H:%M:%S.%f"
        times = f"{stored:%H:%M:%S.%f}"[:-3] + " (sent " + f"{claimed:{claimed_format}}"[:-3] + ")"
        lines.append(f"{times}  {_describe(row['type'], row['actor'], data)}")
    return lines


def _describe(type_name: str, actor: str, data: dict[str, Any]) -> str:
    match type_name:
        case "run.submitted":
            return f"{actor} asked for a run of agent {data['agent']} with input {json.dumps(data['input'])}"
        case "decision.made":
            what = f"tool call {data['tool_call_id']}" if data.get("tool_call_id") else "the run"
            return (
                f"policy gate: {data['effect'].upper()} {what} ({'; '.join(data['reasons'])}) "
                f"[policy {data['policy_revision']}, {data['evaluation_ms']} ms, decision {data['decision_id']}]"
            )
        case "run.queued":
            return f"scheduler: queued (priority {data['priority']})"
        case "run.dispatched":
            return "scheduler: dispatched to the runners"
        case "run.started":
            return f"runner {data['worker']}: started (attempt {data['attempt']})"
        case "tool_call.requested":
            return f"agent asks to call {data['tool']} {json.dumps(data['arguments'])}"
        case "tool_call.completed":
            detail = json.dumps(data.get("result"))[:100] if data["outcome"] == "ok" else data.get("error")
            return f"tool {data['tool']}: {data['outcome']} under decision {data.get('decision_id')}: {detail}"
        case "step.completed":
            return f"step {data['step']}: {data['kind']}: {data.get('summary', '')}"
        case "run.succeeded":
            # Counted as `warden runs` counts them: model turns and tool calls, apart.
            turns = data["steps"] - data["tool_calls"]
            return f"run SUCCEEDED after {turns} model turns and {data['tool_calls']} tool calls"
        case "run.failed":
            return f"run FAILED: {data['reason']}"
    return type_name
