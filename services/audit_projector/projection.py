"""The projector's pure core: stored stream messages in, table rows out, no I/O.

Every message becomes one `events` row, valid or not (garbage is kept raw, with the reason). Valid
envelopes also become merges into the `runs` read model and, for rejections, `rejected_commands`
rows. Row merges are order-independent (see schema.sql), so projecting the commands and events
streams concurrently, or replaying them, gives the same tables.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.bus import MSG_ID_HEADER
from shared.errors import InvalidMessage
from shared.messages import (
    CommandRejected,
    DecisionMade,
    Envelope,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    decode_document,
    validate_document,
)
from shared.subjects import Subjects
from shared.telemetry import trace_id_from_headers


@dataclass(frozen=True)
class StoredMessage:
    """One message as JetStream stored it: where, when, and the exact bytes."""

    stream: str
    seq: int
    subject: str
    headers: Mapping[str, str] | None
    data: bytes
    stored_at: datetime


EventRow = tuple[Any, ...]
RunRow = tuple[Any, ...]
RejectionRow = tuple[Any, ...]

EVENT_COLUMNS = (
    "stream",
    "stream_seq",
    "nats_subject",
    "stored_at",
    "tenant",
    "event_id",
    "type",
    "source",
    "subject",
    "time",
    "actor",
    "correlation_id",
    "causation_id",
    "trace_id",
    "schema_version",
    "idempotency_key",
    "payload",
    "raw",
    "invalid_reason",
)
RUN_COLUMNS = (
    "tenant",
    "run_id",
    "status",
    "status_rank",
    "agent",
    "submitted_by",
    "priority",
    "input",
    "submitted_at",
    "decided_at",
    "decision_id",
    "decision_effect",
    "decision_reasons",
    "policy_revision",
    "queued_at",
    "dispatched_at",
    "started_at",
    "finished_at",
    "steps",
    "tool_calls",
    "output",
    "error",
    "correlation_id",
    "trace_id",
)
DECISION_COLUMNS = (
    "tenant",
    "decision_id",
    "run_id",
    "request_type",
    "request_id",
    "request_seq",
    "tool_call_id",
    "effect",
    "reasons",
    "policy_revision",
    "evaluation_ms",
    "decided_at",
    "trace_id",
)
TOOL_CALL_COLUMNS = (
    "tenant",
    "tool_call_id",
    "run_id",
    "step",
    "tool",
    "arguments",
    "requested_by",
    "requested_at",
    "decision_id",
    "outcome",
    "result",
    "error",
    "completed_at",
    "trace_id",
)
REJECTION_COLUMNS = (
    "tenant",
    "command_stream_seq",
    "command_subject",
    "command_type",
    "command_id",
    "idempotency_key",
    "code",
    "reason",
    "size_bytes",
    "rejected_at",
    "rejection_event_id",
)

# A run's status only moves up this ranking, whatever order its events are projected in.
STATUS_RANK = {
    "unknown": -1,
    "submitted": 0,
    "allowed": 1,
    "awaiting_approval": 1,
    "queued": 2,
    "dispatched": 3,
    "running": 4,
    "succeeded": 5,
    "failed": 5,
    "denied": 5,
}
_DECISION_STATUS = {"allow": "allowed", "deny": "denied", "require_approval": "awaiting_approval"}


@dataclass
class Rows:
    """What one batch of messages adds to each table."""

    events: list[EventRow] = field(default_factory=list)
    runs: list[RunRow] = field(default_factory=list)
    rejections: list[RejectionRow] = field(default_factory=list)
    decisions: list[tuple[Any, ...]] = field(default_factory=list)
    tool_calls: list[tuple[Any, ...]] = field(default_factory=list)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def raw_event_row(message: StoredMessage, tenant: str, reason: str) -> EventRow:
    """The row for a message that is not a storable envelope: attributed by subject, kept byte for byte."""
    idempotency_key = (message.headers or {}).get(MSG_ID_HEADER)
    return (
        message.stream,
        message.seq,
        message.subject,
        message.stored_at,
        tenant,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        trace_id_from_headers(message.headers),
        None,
        idempotency_key,
        None,
        message.data,
        reason,
    )


def _envelope_event_row(message: StoredMessage, document: dict[str, Any], envelope: Envelope[Any]) -> EventRow:
    return (
        message.stream,
        message.seq,
        message.subject,
        message.stored_at,
        envelope.tenant,
        envelope.id,
        envelope.type,
        envelope.source,
        envelope.subject,
        envelope.time,
        envelope.actor,
        envelope.correlation_id,
        envelope.causation_id,
        trace_id_from_headers(message.headers),
        document.get("schema_version", 1),
        (message.headers or {}).get(MSG_ID_HEADER),
        # The data exactly as stored (before any upcast): the log records what was said.
        _json(document.get("data")),
        None,
        None,
    )


def _run_row(envelope: Envelope[Any], trace_id: str | None, **columns: Any) -> RunRow:
    status = columns.pop("status", "unknown")
    values: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    values.update(
        tenant=envelope.tenant,
        run_id=envelope.subject,
        status=status,
        status_rank=STATUS_RANK[status],
        steps=0,
        tool_calls=0,
        correlation_id=envelope.correlation_id,
        trace_id=trace_id,
    )
    values.update(columns)
    return tuple(values[name] for name in RUN_COLUMNS)


def run_row(envelope: Envelope[Any], trace_id: str | None) -> RunRow | None:
    """The merge one envelope makes into its run's row, or None if it does not touch a run."""
    data = envelope.data
    match data:
        case RunSubmitted():
            return _run_row(
                envelope,
                trace_id,
                status="submitted",
                agent=data.agent,
                submitted_by=envelope.actor,
                priority=data.priority,
                input=_json(data.input),
                submitted_at=envelope.time,
            )
        case DecisionMade(request_type=RunSubmitted.TYPE):
            return _run_row(
                envelope,
                trace_id,
                status=_DECISION_STATUS[data.effect],
                decided_at=envelope.time,
                decision_id=data.decision_id,
                decision_effect=data.effect,
                decision_reasons=_json(data.reasons),
                policy_revision=data.policy_revision,
            )
        case RunQueued():
            return _run_row(envelope, trace_id, status="queued", queued_at=envelope.time)
        case RunDispatched():
            return _run_row(envelope, trace_id, status="dispatched", dispatched_at=envelope.time)
        case RunStarted():
            return _run_row(envelope, trace_id, status="running", started_at=envelope.time)
        case StepCompleted():
            return _run_row(envelope, trace_id, steps=1)
        case ToolCallCompleted():
            return _run_row(envelope, trace_id, tool_calls=1)
        case RunSucceeded():
            return _run_row(
                envelope, trace_id, status="succeeded", finished_at=envelope.time, output=_json(data.output)
            )
        case RunFailed():
            return _run_row(envelope, trace_id, status="failed", finished_at=envelope.time, error=data.reason)
    return None


def rejection_row(envelope: Envelope[Any]) -> RejectionRow | None:
    data = envelope.data
    if not isinstance(data, CommandRejected):
        return None
    return (
        envelope.tenant,
        data.command_stream_seq,
        data.command_subject,
        data.command_type,
        data.command_id,
        data.idempotency_key,
        data.code,
        data.reason,
        data.size_bytes,
        envelope.time,
        envelope.id,
    )


def decision_row(envelope: Envelope[Any], trace_id: str | None) -> tuple[Any, ...] | None:
    data = envelope.data
    if not isinstance(data, DecisionMade):
        return None
    return (
        envelope.tenant,
        data.decision_id,
        envelope.subject,
        data.request_type,
        data.request_id,
        data.request_seq,
        data.tool_call_id,
        data.effect,
        _json(data.reasons),
        data.policy_revision,
        data.evaluation_ms,
        envelope.time,
        trace_id,
    )


def tool_call_row(envelope: Envelope[Any], trace_id: str | None) -> tuple[Any, ...] | None:
    """A request fills what was asked; a completion fills what came of it. Either may come first."""
    data = envelope.data
    if isinstance(data, ToolCallRequested):
        return (
            envelope.tenant,
            data.tool_call_id,
            envelope.subject,
            data.step,
            data.tool,
            _json(data.arguments),
            envelope.actor,
            envelope.time,
            None,
            None,
            None,
            None,
            None,
            trace_id,
        )
    if isinstance(data, ToolCallCompleted):
        return (
            envelope.tenant,
            data.tool_call_id,
            envelope.subject,
            data.step,
            data.tool,
            None,
            None,
            None,
            data.decision_id,
            data.outcome,
            _json(data.result),
            data.error,
            envelope.time,
            trace_id,
        )
    return None


def project(messages: Iterable[StoredMessage], subjects: Subjects) -> Rows:
    """Turn stored messages into rows. Never raises on bad input: bad input is recorded, raw."""
    rows = Rows()
    for message in messages:
        tenant = subjects.tenant_of(message.subject)
        if b"\\u0000" in message.data:
            # Valid JSON, but Postgres text and jsonb cannot hold NUL: keep the bytes instead.
            rows.events.append(raw_event_row(message, tenant, "contains a NUL character (\\u0000)"))
            continue
        try:
            document = decode_document(message.data)
            envelope = validate_document(document)
            subjects.check_envelope_subject(envelope, message.subject)
        except InvalidMessage as exc:
            rows.events.append(raw_event_row(message, tenant, str(exc)))
            continue
        rows.events.append(_envelope_event_row(message, document, envelope))
        trace_id = trace_id_from_headers(message.headers)
        if (run := run_row(envelope, trace_id)) is not None:
            rows.runs.append(run)
        if (rejection := rejection_row(envelope)) is not None:
            rows.rejections.append(rejection)
        if (decided := decision_row(envelope, trace_id)) is not None:
            rows.decisions.append(decided)
        if (tool_call := tool_call_row(envelope, trace_id)) is not None:
            rows.tool_calls.append(tool_call)
    return rows
