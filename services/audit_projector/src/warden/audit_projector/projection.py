"""The projector's pure core: stored stream messages in, table rows out, no I/O.

Every message becomes one `events` row, valid or not (garbage is kept raw, with the reason). Valid
envelopes also become merges into the `runs` and `tool_calls` read models and rows of `decisions`
and `rejected_commands`. Row merges are order-independent (see schema.sql), so projecting the
commands and events streams concurrently, or replaying them, gives the same tables.

`project` is the one code path for the live projector and for `warden audit replay`, so both give
the same rows by construction. It runs once per stored message, which makes it the replay's hot
loop: it parses JSON with pydantic-core's parser, serialises jsonb with pydantic-core, and merges
the read-model rows of a batch per primary key in memory, exactly as the upserts would merge them
one by one, so a batch sends one upsert per run instead of one per event.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import pydantic
import pydantic_core

from warden.admission import CommandRules, check_key_scope
from warden.decoding import check_size, recordable_text
from warden.errors import InvalidMessage
from warden.messages import (
    ENVELOPE_TYPES,
    MESSAGE_TYPES,
    PAYLOAD_TYPES,
    CommandRejected,
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    StreamGapDetected,
    ToolCallCompleted,
    ToolCallRequested,
    decode_document,
    validate_document,
)
from warden.subjects import Subjects
from warden.telemetry import trace_id_from_headers
from warden.wire import MSG_ID_HEADER


class StoredMessage(NamedTuple):
    """One message as JetStream stored it: where, when, and the exact bytes.

    A named tuple rather than a frozen dataclass: a replay builds a million of them, and a frozen
    dataclass's __init__ costs several times as much.
    """

    stream: str
    seq: int
    subject: str
    headers: Mapping[str, str] | None
    data: bytes
    stored_at: datetime


EventRow = tuple[Any, ...]
RunRow = tuple[Any, ...]
RejectionRow = tuple[Any, ...]
DecisionRow = tuple[Any, ...]
ToolCallRow = tuple[Any, ...]

EVENT_COLUMNS = (
    "stream",
    "stream_seq",
    "nats_subject",
    "stored_at",
    "tenant",
    "event_id",
    "type",
    "source",
    "entity_id",
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

# How a run's row merges (the upsert in store.py says the same in SQL): status only moves up its
# rank, counters add, and every other column keeps the first value that is not NULL.
_RUN_MERGED_APART = ("tenant", "run_id", "status", "status_rank", "steps", "tool_calls")
RUN_SET_ONCE_COLUMNS = tuple(column for column in RUN_COLUMNS if column not in _RUN_MERGED_APART)
# A tool call's row merges column by column: the first value that is not NULL stays.
TOOL_CALL_MERGED_COLUMNS = tuple(column for column in TOOL_CALL_COLUMNS if column not in ("tenant", "tool_call_id"))

_RUN_INDEX = {column: index for index, column in enumerate(RUN_COLUMNS)}
_STATUS, _RANK, _STEPS, _TOOL_CALLS = (_RUN_INDEX[c] for c in ("status", "status_rank", "steps", "tool_calls"))
_CORRELATION_ID, _TRACE_ID = _RUN_INDEX["correlation_id"], _RUN_INDEX["trace_id"]
_RUN_SET_ONCE = tuple(_RUN_INDEX[column] for column in RUN_SET_ONCE_COLUMNS)
_NO_VALUES = (None,) * (len(RUN_COLUMNS) - 4)
_TOOL_CALL_MERGED = tuple(TOOL_CALL_COLUMNS.index(column) for column in TOOL_CALL_MERGED_COLUMNS)


@dataclass
class Rows:
    """What a sequence of messages adds to each table.

    Read-model rows are merged per primary key as they arrive, in message order, with the rules
    the database applies (see `merge_run` and store.py): applying the merged row once leaves the
    same row as applying each message's row in turn, so a batch needs one upsert per key. Every
    valid message's values fit their columns (the models bound them), so merging never hides a
    value Postgres would refuse.
    """

    events: list[EventRow] = field(default_factory=list)
    runs: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    rejections: dict[tuple[str, int], RejectionRow] = field(default_factory=dict)
    decisions: dict[tuple[str, str], DecisionRow] = field(default_factory=dict)
    tool_calls: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def merge_run(self, row: RunRow) -> None:
        """Merge a whole runs row (as `MERGE_RUN` would upsert it)."""
        values = [(index, row[index]) for index in _RUN_SET_ONCE if row[index] is not None]
        self.merge_run_values((row[0], row[1]), row[_STATUS], values, steps=row[_STEPS], tool_calls=row[_TOOL_CALLS])

    def merge_run_values(
        self, key: tuple[str, str], status: str, values: Iterable[tuple[int, Any]], *, steps: int, tool_calls: int
    ) -> None:
        """Merge a runs row given as its status, counters and set-once (column index, value) pairs.

        Mirrors store.MERGE_RUN: a later row wins the status only with a strictly higher rank,
        counters add, and a set-once column keeps its first value that is not NULL.
        """
        rank = STATUS_RANK[status]
        current = self.runs.get(key)
        if current is None:
            current = self.runs[key] = [*key, status, rank, *_NO_VALUES]
            current[_STEPS], current[_TOOL_CALLS] = steps, tool_calls
            for index, value in values:
                current[index] = value
            return
        if rank > current[_RANK]:
            current[_STATUS], current[_RANK] = status, rank
        current[_STEPS] += steps
        current[_TOOL_CALLS] += tool_calls
        for index, value in values:
            if current[index] is None:
                current[index] = value

    def merge_tool_call(self, row: ToolCallRow) -> None:
        current = self.tool_calls.get((row[0], row[1]))
        if current is None:
            self.tool_calls[row[0], row[1]] = list(row)
            return
        for index in _TOOL_CALL_MERGED:  # mirrors store.MERGE_TOOL_CALL
            if current[index] is None:
                current[index] = row[index]

    def add_decision(self, row: DecisionRow) -> None:
        self.decisions.setdefault((row[0], row[1]), row)  # ON CONFLICT DO NOTHING: the first stays

    def add_rejection(self, row: RejectionRow) -> None:
        self.rejections.setdefault((row[0], row[1]), row)  # ON CONFLICT DO NOTHING: the first stays

    def absorb(self, later: "Rows") -> None:
        """Add rows projected from messages that come after this one's (merges are associative)."""
        self.events += later.events
        for run in later.runs.values():
            self.merge_run(tuple(run))
        for rejection in later.rejections.values():
            self.add_rejection(rejection)
        for decision in later.decisions.values():
            self.add_decision(decision)
        for tool_call in later.tool_calls.values():
            self.merge_tool_call(tuple(tool_call))

    def run_rows(self) -> list[RunRow]:
        """The merged runs rows in key order, so concurrent batches lock rows in one order."""
        return [tuple(row) for _, row in sorted(self.runs.items())]

    def tool_call_rows(self) -> list[ToolCallRow]:
        return [tuple(row) for _, row in sorted(self.tool_calls.items())]


def _json(value: Any) -> str:
    """JSON text for a jsonb column.

    Postgres normalises jsonb (key order, white space, how a number is spelt), so any faithful
    serialisation stores the same value; pydantic-core's is about three times faster than the
    json module's. Decoded messages hold nothing it refuses (warden.decoding).
    """
    return pydantic_core.to_json(value).decode()


def _validate(document: dict[str, Any]) -> Envelope[Any]:
    """`validate_document` for the usual case, a known type at its current version, without its wrappers.

    For such a document `validate_document` only calls the type's validator, so this calls it
    directly. Anything else (an unknown type, an older version to upcast, an invalid document)
    goes through `validate_document`, for its verdict and its wording.
    """
    type_name = document.get("type")
    if type(type_name) is str and type_name in ENVELOPE_TYPES:
        version = document.get("schema_version", 1)
        if type(version) is int and version == MESSAGE_TYPES[type_name].SCHEMA_VERSION:
            try:
                envelope: Envelope[Any] = ENVELOPE_TYPES[type_name].__pydantic_validator__.validate_python(document)
            except pydantic.ValidationError:
                pass
            else:
                return envelope
    return validate_document(document)


def raw_event_row(message: StoredMessage, subjects: Subjects, reason: str) -> EventRow:
    """The row for a message that is not a storable envelope: attributed by subject, kept byte for byte.

    Everything in it but the bytes comes from what the sender chose (subject, headers) and is
    made safe to store, so the row itself can never be refused.
    """
    return (
        message.stream,
        message.seq,
        recordable_text(message.subject, 1024),
        message.stored_at,
        subjects.tenant_of(message.subject),
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
        _idempotency_key(message),
        None,
        message.data,
        recordable_text(reason, 2000),
    )


def _idempotency_key(message: StoredMessage) -> str | None:
    key = message.headers.get(MSG_ID_HEADER) if message.headers else None
    return recordable_text(key, 1024) if key is not None else None


def _envelope_event_row(
    message: StoredMessage, document: dict[str, Any], envelope: Envelope[Any], trace_id: str | None
) -> EventRow:
    return (
        message.stream,
        message.seq,
        message.subject,
        message.stored_at,
        envelope.tenant,
        envelope.id,
        envelope.type,
        envelope.source,
        envelope.entity_id,
        envelope.time,
        envelope.actor,
        envelope.correlation_id,
        envelope.causation_id,
        trace_id,
        document.get("schema_version", 1),
        _idempotency_key(message),
        # The data exactly as stored (before any upcast): the log records what was said.
        _json(document.get("data")),
        None,
        None,
    )


def _run_change(
    rows: Rows,
    envelope: Envelope[Any],
    trace_id: str | None,
    status: str = "unknown",
    *,
    steps: int = 0,
    tool_calls: int = 0,
    **columns: Any,
) -> None:
    """Merge what one envelope says about its run into the run's row."""
    values = [(_CORRELATION_ID, envelope.correlation_id), (_TRACE_ID, trace_id)]
    values += [(_RUN_INDEX[column], value) for column, value in columns.items()]
    rows.merge_run_values((envelope.tenant, envelope.entity_id), status, values, steps=steps, tool_calls=tool_calls)


def _rejection_row(envelope: Envelope[Any], data: CommandRejected) -> RejectionRow:
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


def _decision_row(envelope: Envelope[Any], data: DecisionMade, trace_id: str | None) -> DecisionRow:
    return (
        envelope.tenant,
        data.decision_id,
        envelope.entity_id,
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


# What each message type adds beyond its `events` row. A tool call's request fills what was
# asked and its completion what came of it; either may be projected first.


def _run_submitted(rows: Rows, envelope: Envelope[Any], data: RunSubmitted, trace_id: str | None) -> None:
    _run_change(
        rows,
        envelope,
        trace_id,
        "submitted",
        agent=data.agent,
        submitted_by=envelope.actor,
        priority=data.priority,
        input=_json(data.input),
        submitted_at=envelope.time,
    )


def _decision_made(rows: Rows, envelope: Envelope[Any], data: DecisionMade, trace_id: str | None) -> None:
    rows.add_decision(_decision_row(envelope, data, trace_id))
    if data.request_type == RunSubmitted.TYPE:
        _run_change(
            rows,
            envelope,
            trace_id,
            _DECISION_STATUS[data.effect],
            decided_at=envelope.time,
            decision_id=data.decision_id,
            decision_effect=data.effect,
            decision_reasons=_json(data.reasons),
            policy_revision=data.policy_revision,
        )


def _tool_call_requested(rows: Rows, envelope: Envelope[Any], data: ToolCallRequested, trace_id: str | None) -> None:
    rows.merge_tool_call(
        (
            envelope.tenant,
            data.tool_call_id,
            envelope.entity_id,
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
    )


def _tool_call_completed(rows: Rows, envelope: Envelope[Any], data: ToolCallCompleted, trace_id: str | None) -> None:
    rows.merge_tool_call(
        (
            envelope.tenant,
            data.tool_call_id,
            envelope.entity_id,
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
    )
    _run_change(rows, envelope, trace_id, tool_calls=1)


def _command_rejected(rows: Rows, envelope: Envelope[Any], data: CommandRejected, trace_id: str | None) -> None:
    rows.add_rejection(_rejection_row(envelope, data))


def _run_succeeded(rows: Rows, envelope: Envelope[Any], data: RunSucceeded, trace_id: str | None) -> None:
    _run_change(rows, envelope, trace_id, "succeeded", finished_at=envelope.time, output=_json(data.output))


def _run_failed(rows: Rows, envelope: Envelope[Any], data: RunFailed, trace_id: str | None) -> None:
    _run_change(rows, envelope, trace_id, "failed", finished_at=envelope.time, error=data.reason)


def _step_completed(rows: Rows, envelope: Envelope[Any], data: StepCompleted, trace_id: str | None) -> None:
    # The most frequent message by far, so `_run_change` spelt out.
    values = ((_CORRELATION_ID, envelope.correlation_id), (_TRACE_ID, trace_id))
    rows.merge_run_values((envelope.tenant, envelope.entity_id), "unknown", values, steps=1, tool_calls=0)


ReadModelProjector = Callable[[Rows, Envelope[Any], Any, str | None], None]

# Looked up by the payload's exact class: one dict look-up, where isinstance() on pydantic models
# (a Python-level __instancecheck__) would cost more than the rest of the row.
READ_MODELS: dict[type[Payload], ReadModelProjector] = {
    RunSubmitted: _run_submitted,
    ToolCallRequested: _tool_call_requested,
    CommandRejected: _command_rejected,
    DecisionMade: _decision_made,
    RunQueued: lambda rows, envelope, data, trace_id: _run_change(
        rows, envelope, trace_id, "queued", queued_at=envelope.time
    ),
    RunDispatched: lambda rows, envelope, data, trace_id: _run_change(
        rows, envelope, trace_id, "dispatched", dispatched_at=envelope.time
    ),
    RunStarted: lambda rows, envelope, data, trace_id: _run_change(
        rows, envelope, trace_id, "running", started_at=envelope.time
    ),
    StepCompleted: _step_completed,
    ToolCallCompleted: _tool_call_completed,
    RunSucceeded: _run_succeeded,
    RunFailed: _run_failed,
    # Gaps are written to stream_gaps where they are found (store.py, replay.py), not from this event.
    StreamGapDetected: lambda rows, envelope, data, trace_id: None,
}
assert set(READ_MODELS) == set(PAYLOAD_TYPES), "every message type says what it adds to the read models"


# Subjects already checked: the one subject an envelope of (prefix, type, tenant, entity id) may
# arrive on. The messages of one run share all but the type, so most checks are a look-up here.
_CHECKED_SUBJECTS: dict[tuple[str, str, str, str], str] = {}
_CHECKED_SUBJECTS_MAX = 10_000


def _check_subject(subjects: Subjects, envelope: Envelope[Any], nats_subject: str) -> None:
    """`subjects.check_envelope_subject`, remembered: the expected subject depends only on the key."""
    key = (subjects.prefix, envelope.type, envelope.tenant, envelope.entity_id)
    if _CHECKED_SUBJECTS.get(key) != nats_subject:
        subjects.check_envelope_subject(envelope, nats_subject)  # raises InvalidMessage on a mismatch
        if len(_CHECKED_SUBJECTS) >= _CHECKED_SUBJECTS_MAX:
            _CHECKED_SUBJECTS.clear()
        _CHECKED_SUBJECTS[key] = nats_subject


def read_stored(message: StoredMessage, rules: CommandRules) -> tuple[dict[str, Any], Envelope[Any]]:
    """A stored message's document and envelope, or `InvalidMessage` saying why it is not a valid one.

    A command is judged by the gate's own admission rules (warden.admission), in the gate's
    order, so a command the gate rejected shapes no read model.
    """
    is_command = message.subject.startswith(rules.subjects.command_prefix)
    if is_command:
        check_size(message.data, rules.max_bytes)
    document = decode_document(message.data)
    envelope = _validate(document)
    _check_subject(rules.subjects, envelope, message.subject)
    if is_command:
        check_key_scope(envelope, message.headers)
    return document, envelope


def project(messages: Iterable[StoredMessage], rules: CommandRules, rows: Rows | None = None) -> Rows:
    """Turn stored messages into rows, added to `rows` if given.

    Never raises on bad input: bad input is recorded, raw, with the reason. That includes input
    that makes this code fail, which would otherwise stop the projection at the same message on
    every restart.
    """
    rows = Rows() if rows is None else rows
    events = rows.events
    for message in messages:
        try:
            document, envelope = read_stored(message, rules)
        except InvalidMessage as exc:
            events.append(raw_event_row(message, rules.subjects, str(exc)))
            continue
        except Exception as exc:
            reason = f"unreadable: the projector failed on it ({type(exc).__name__}: {exc})"
            events.append(raw_event_row(message, rules.subjects, reason))
            continue
        trace_id = trace_id_from_headers(message.headers)
        events.append(_envelope_event_row(message, document, envelope, trace_id))
        data = envelope.data
        READ_MODELS[type(data)](rows, envelope, data, trace_id)
    return rows
