"""The projector's pure core: stored stream messages in, table rows out, no I/O.

Every message becomes one `events` row, valid or not (garbage is kept raw, with the reason). Valid
envelopes also become merges into the `runs` and `tool_calls` read models and rows of `decisions`,
`rejected_commands` and `dead_letters`. Row merges are order-independent (see schema.sql), so projecting the
commands and events streams concurrently, or replaying them, gives the same tables.

`project` is the one code path for the live projector and for `warden audit replay`, so both give
the same rows by construction. It runs once per stored message, which makes it the replay's hot
loop: it parses JSON with pydantic-core's parser, serialises jsonb with pydantic-core, and merges
the read-model rows of a batch per primary key in memory, exactly as the upserts would merge them
one by one, so a batch sends one upsert per run instead of one per event.
"""

import base64
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, NamedTuple, cast

import pydantic
import pydantic_core

from warden.admission import CommandRules, check_key_scope
from warden.audit_chain import CONTENT_COLUMNS, ChainHeads, canonical_json
from warden.decoding import check_size, recordable_text
from warden.errors import InvalidMessage
from warden.messages import (
    ENVELOPE_TYPES,
    MESSAGE_TYPES,
    PAYLOAD_TYPES,
    ApprovalAnswered,
    ApprovalRequested,
    CommandRejected,
    DecisionMade,
    DecisionRefused,
    DecisionShadowed,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    MessageDeadLettered,
    ModelCallRequested,
    Payload,
    PolicyActivated,
    PolicyChanged,
    PolicyChangeRequested,
    RunCancelled,
    RunCancelRequested,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunQueued,
    RunResumed,
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


class EventRow(NamedTuple):
    """A row of `events`: every stored message, a valid envelope in columns, anything else raw."""

    stream: str
    stream_seq: int
    nats_subject: str
    stored_at: datetime
    tenant: str
    event_id: str | None = None
    type: str | None = None
    source: str | None = None
    entity_id: str | None = None
    time: datetime | None = None
    actor: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    trace_id: str | None = None
    schema_version: int | None = None
    idempotency_key: str | None = None
    payload: str | None = None  # jsonb text
    raw: bytes | None = None
    invalid_reason: str | None = None
    # Its place in its chain (stream, tenant) and its chain hash (warden.audit_chain): set by the
    # writer, which alone knows the chain's head, after projecting.
    chain_index: int | None = None
    chain_hash: bytes | None = None


class RunRow(NamedTuple):
    """A row of `runs`: what the messages of one run say about it, merged (see RUN_MERGE)."""

    tenant: str
    run_id: str
    status: str
    status_rank: int
    agent: str | None = None
    submitted_by: str | None = None
    priority: int | None = None
    input: str | None = None
    submitted_at: datetime | None = None
    decided_at: datetime | None = None
    decision_id: str | None = None
    decision_effect: str | None = None
    decision_reasons: str | None = None
    policy_revision: str | None = None
    queued_at: datetime | None = None
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: int = 0
    tool_calls: int = 0
    output: str | None = None
    error: str | None = None
    correlation_id: str | None = None
    trace_id: str | None = None
    model_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanousd: int = 0  # billionths of a US dollar: integers add up exactly, in any order


class DecisionRow(NamedTuple):
    """A row of `decisions`: one per decision, the first stored kept."""

    tenant: str
    decision_id: str
    run_id: str
    request_type: str
    request_id: str
    request_seq: int
    tool_call_id: str | None
    effect: str
    reasons: str
    policy_revision: str
    evaluation_ms: float
    decided_at: datetime
    trace_id: str | None
    input: str | None = None  # the policy input it was made on (JSON); None on decisions recorded before


class ToolCallRow(NamedTuple):
    """A row of `tool_calls`: its request fills what was asked, its completion what came of it."""

    tenant: str
    tool_call_id: str
    run_id: str
    step: int
    tool: str
    arguments: str | None = None
    requested_by: str | None = None
    requested_at: datetime | None = None
    decision_id: str | None = None
    outcome: str | None = None
    result: str | None = None
    error: str | None = None
    completed_at: datetime | None = None
    trace_id: str | None = None


class RejectionRow(NamedTuple):
    """A row of `rejected_commands`: one per rejected command, the first stored kept."""

    tenant: str
    command_stream_seq: int
    command_subject: str
    command_type: str | None
    command_id: str | None
    idempotency_key: str | None
    code: str
    reason: str
    size_bytes: int
    rejected_at: datetime
    rejection_event_id: str


class DeadLetterRow(NamedTuple):
    """A row of `dead_letters`: a message a consumer gave up on, one per message and consumer, the first kept."""

    stream: str
    stream_seq: int
    consumer: str
    reason: str
    deliveries: int | None = None
    recorded_at: datetime | None = None  # when the consumer gave up; None for the projector's own
    subject: str | None = None
    raw: bytes | None = None
    raw_note: str | None = None  # why `raw` is absent
    event_id: str | None = None  # the message.dead_lettered event it was projected from


# The consumer named on the dead letters the projector writes itself: messages Postgres refused
# even raw (see store.py), which were delivered to its `audit_projector` consumers.
PROJECTOR_CONSUMER = "audit_projector"


def chained_events(heads: ChainHeads, events: Iterable[EventRow]) -> list[EventRow]:
    """The rows with their chain values, extending `heads` (warden.audit_chain), in order."""
    return [_new_event_row(EventRow, row) for row in heads.chained(events, canonical_text=True)]


def unstorable_dead_letter(message: StoredMessage, reason: str) -> DeadLetterRow:
    """The dead letter for a message Postgres refuses to store in any form: its bytes stay in the stream."""
    return DeadLetterRow(
        stream=message.stream,
        stream_seq=message.seq,
        consumer=PROJECTOR_CONSUMER,
        reason=recordable_text(reason, 2000),
        subject=recordable_text(message.subject, 1024),
        raw_note=f"not stored: Postgres refused it; it is still in {message.stream} at sequence {message.seq}",
    )


EVENT_COLUMNS = EventRow._fields
assert (*CONTENT_COLUMNS, "chain_index", "chain_hash") == EVENT_COLUMNS, "a chain hash covers every other column"
_new_event_row = tuple.__new__
RUN_COLUMNS = RunRow._fields
DECISION_COLUMNS = DecisionRow._fields
TOOL_CALL_COLUMNS = ToolCallRow._fields
REJECTION_COLUMNS = RejectionRow._fields
DEAD_LETTER_COLUMNS = DeadLetterRow._fields

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
    "cancelled": 5,
    "denied": 5,
}
_DECISION_STATUS = {"allow": "allowed", "deny": "denied", "require_approval": "awaiting_approval"}


class Merge(Enum):
    """How a read-model column combines with the row already there for its key.

    Declared once per column (RUN_MERGE, TOOL_CALL_MERGE); `Rows` merges in memory by these
    declarations and store.py generates the upserts' SQL from the same ones, so the live
    projector, a batch and a replay apply one rule.
    """

    KEY = "key"  # part of the primary key
    RANKED = "ranked"  # replaced only by a value whose `<column>_rank` is strictly higher
    HIGHEST = "highest"  # the highest value stays (a RANKED column's rank)
    ADD = "add"  # counters: added up
    FIRST = "first"  # the first value that is not NULL stays


RUN_MERGE: dict[str, Merge] = dict.fromkeys(RUN_COLUMNS, Merge.FIRST) | {
    "tenant": Merge.KEY,
    "run_id": Merge.KEY,
    "status": Merge.RANKED,
    "status_rank": Merge.HIGHEST,
    "steps": Merge.ADD,
    "tool_calls": Merge.ADD,
    "model_calls": Merge.ADD,
    "input_tokens": Merge.ADD,
    "output_tokens": Merge.ADD,
    "cost_nanousd": Merge.ADD,
}
TOOL_CALL_MERGE: dict[str, Merge] = dict.fromkeys(TOOL_CALL_COLUMNS, Merge.FIRST) | {
    "tenant": Merge.KEY,
    "tool_call_id": Merge.KEY,
}


def _indexes(columns: tuple[str, ...], merge: dict[str, Merge], kind: Merge) -> tuple[int, ...]:
    return tuple(index for index, column in enumerate(columns) if merge[column] is kind)


# The declarations as column positions, for the in-memory merges (the hot loop of a replay).
_RUN_FIRST = _indexes(RUN_COLUMNS, RUN_MERGE, Merge.FIRST)
_RUN_ADDED = _indexes(RUN_COLUMNS, RUN_MERGE, Merge.ADD)
_TOOL_CALL_FIRST = _indexes(TOOL_CALL_COLUMNS, TOOL_CALL_MERGE, Merge.FIRST)
_STATUS, _RANK = RUN_COLUMNS.index("status"), RUN_COLUMNS.index("status_rank")
assert _indexes(RUN_COLUMNS, RUN_MERGE, Merge.RANKED) == (_STATUS,), "the status is the one ranked column"
assert _indexes(RUN_COLUMNS, RUN_MERGE, Merge.HIGHEST) == (_RANK,), "and status_rank its rank"
_RUN_INDEX = {column: index for index, column in enumerate(RUN_COLUMNS)}
_CORRELATION_ID, _TRACE_ID = _RUN_INDEX["correlation_id"], _RUN_INDEX["trace_id"]
_EMPTY_RUN = RunRow("", "", "unknown", STATUS_RANK["unknown"])
# What one step.completed adds to its run's counters.
_ONE_STEP = ((_RUN_INDEX["steps"], 1),)
_STEPS, _MODEL_CALLS = _RUN_INDEX["steps"], _RUN_INDEX["model_calls"]
_INPUT_TOKENS, _OUTPUT_TOKENS, _COST = (
    _RUN_INDEX["input_tokens"],
    _RUN_INDEX["output_tokens"],
    _RUN_INDEX["cost_nanousd"],
)
_ONE_TOOL_CALL = ((_RUN_INDEX["tool_calls"], 1),)


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
    dead_letters: dict[tuple[str, int, str], DeadLetterRow] = field(default_factory=dict)

    def merge_run(self, row: RunRow) -> None:
        """Merge a whole runs row, by RUN_MERGE (as the upsert in store.py does)."""
        values = [(index, row[index]) for index in _RUN_FIRST if row[index] is not None]
        added = [(index, cast(int, row[index])) for index in _RUN_ADDED]
        self.merge_run_values((row.tenant, row.run_id), row.status, values, added)

    def merge_run_values(
        self,
        key: tuple[str, str],
        status: str,
        values: Iterable[tuple[int, Any]],
        added: Iterable[tuple[int, int]] = (),
    ) -> None:
        """Merge into a run's row its status, (column index, value) pairs of FIRST columns and
        (column index, amount) pairs of ADD columns, by RUN_MERGE."""
        rank = STATUS_RANK[status]
        current = self.runs.get(key)
        if current is None:
            current = self.runs[key] = [*key, status, rank, *_EMPTY_RUN[4:]]
            for index, value in values:
                current[index] = value
            for index, amount in added:
                current[index] = amount
            return
        if rank > current[_RANK]:  # RANKED, then HIGHEST
            current[_STATUS], current[_RANK] = status, rank
        for index, amount in added:
            current[index] += amount
        for index, value in values:
            if current[index] is None:
                current[index] = value

    def merge_tool_call(self, row: ToolCallRow) -> None:
        """Merge a tool call's row, by TOOL_CALL_MERGE."""
        current = self.tool_calls.get((row.tenant, row.tool_call_id))
        if current is None:
            self.tool_calls[row.tenant, row.tool_call_id] = list(row)
            return
        for index in _TOOL_CALL_FIRST:
            if current[index] is None:
                current[index] = row[index]

    def add_decision(self, row: DecisionRow) -> None:
        self.decisions.setdefault((row.tenant, row.decision_id), row)  # ON CONFLICT DO NOTHING: the first stays

    def add_rejection(self, row: RejectionRow) -> None:
        self.rejections.setdefault((row.tenant, row.command_stream_seq), row)  # ON CONFLICT DO NOTHING

    def add_dead_letter(self, row: DeadLetterRow) -> None:
        self.dead_letters.setdefault((row.stream, row.stream_seq, row.consumer), row)  # ON CONFLICT DO NOTHING

    def absorb(self, later: "Rows") -> None:
        """Add rows projected from messages that come after this one's (merges are associative)."""
        self.events += later.events
        for run in later.run_rows():
            self.merge_run(run)
        for rejection in later.rejections.values():
            self.add_rejection(rejection)
        for decision in later.decisions.values():
            self.add_decision(decision)
        for tool_call in later.tool_call_rows():
            self.merge_tool_call(tool_call)
        for dead_letter in later.dead_letters.values():
            self.add_dead_letter(dead_letter)

    def run_rows(self) -> list[RunRow]:
        """The merged runs rows in key order, so concurrent batches lock rows in one order."""
        return [RunRow._make(row) for _, row in sorted(self.runs.items())]

    def tool_call_rows(self) -> list[ToolCallRow]:
        return [ToolCallRow._make(row) for _, row in sorted(self.tool_calls.items())]


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
    return EventRow(
        stream=message.stream,
        stream_seq=message.seq,
        nats_subject=recordable_text(message.subject, 1024),
        stored_at=message.stored_at,
        tenant=subjects.tenant_of(message.subject),
        trace_id=trace_id_from_headers(message.headers),
        idempotency_key=_idempotency_key(message),
        raw=message.data,
        invalid_reason=recordable_text(reason, 2000),
    )


def _idempotency_key(message: StoredMessage) -> str | None:
    key = message.headers.get(MSG_ID_HEADER) if message.headers else None
    return recordable_text(key, 1024) if key is not None else None


def _envelope_event_row(
    message: StoredMessage, document: dict[str, Any], envelope: Envelope[Any], trace_id: str | None
) -> EventRow:
    # Made as a plain tuple is (tuple.__new__, the C constructor): this runs once per message, and
    # EventRow's own __new__ (a Python function of 19 arguments) costs a replay a few percent.
    return _new_event_row(
        EventRow,
        (
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
            # The data exactly as stored (before any upcast): the log records what was said. In
            # canonical form, so that hashing the row for its chain needs no second serialisation.
            canonical_json(document.get("data")),
            None,
            None,
            None,
            None,
        ),
    )


def _run_change(
    rows: Rows,
    envelope: Envelope[Any],
    trace_id: str | None,
    status: str = "unknown",
    *,
    added: tuple[tuple[int, int], ...] = (),
    **columns: Any,
) -> None:
    """Merge what one envelope says about its run into the run's row."""
    values = [(_CORRELATION_ID, envelope.correlation_id), (_TRACE_ID, trace_id)]
    values += [(_RUN_INDEX[column], value) for column, value in columns.items()]
    rows.merge_run_values((envelope.tenant, envelope.entity_id), status, values, added)


def _rejection_row(envelope: Envelope[Any], data: CommandRejected) -> RejectionRow:
    return RejectionRow(
        tenant=envelope.tenant,
        command_stream_seq=data.command_stream_seq,
        command_subject=data.command_subject,
        command_type=data.command_type,
        command_id=data.command_id,
        idempotency_key=data.idempotency_key,
        code=data.code,
        reason=data.reason,
        size_bytes=data.size_bytes,
        rejected_at=envelope.time,
        rejection_event_id=envelope.id,
    )


def _decision_row(envelope: Envelope[Any], data: DecisionMade, trace_id: str | None) -> DecisionRow:
    return DecisionRow(
        tenant=envelope.tenant,
        decision_id=data.decision_id,
        run_id=envelope.entity_id,
        request_type=data.request_type,
        request_id=data.request_id,
        request_seq=data.request_seq,
        tool_call_id=data.tool_call_id,
        effect=data.effect,
        reasons=_json(data.reasons),
        policy_revision=data.policy_revision,
        evaluation_ms=data.evaluation_ms,
        decided_at=envelope.time,
        trace_id=trace_id,
        input=_json(data.input) if data.input is not None else None,
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
        ToolCallRow(
            tenant=envelope.tenant,
            tool_call_id=data.tool_call_id,
            run_id=envelope.entity_id,
            step=data.step,
            tool=data.tool,
            arguments=_json(data.arguments),
            requested_by=envelope.actor,
            requested_at=envelope.time,
            trace_id=trace_id,
        )
    )


def _tool_call_completed(rows: Rows, envelope: Envelope[Any], data: ToolCallCompleted, trace_id: str | None) -> None:
    rows.merge_tool_call(
        ToolCallRow(
            tenant=envelope.tenant,
            tool_call_id=data.tool_call_id,
            run_id=envelope.entity_id,
            step=data.step,
            tool=data.tool,
            decision_id=data.decision_id,
            outcome=data.outcome,
            result=_json(data.result),
            error=data.error,
            completed_at=envelope.time,
            trace_id=trace_id,
        )
    )
    _run_change(rows, envelope, trace_id, added=_ONE_TOOL_CALL)


def _command_rejected(rows: Rows, envelope: Envelope[Any], data: CommandRejected, trace_id: str | None) -> None:
    rows.add_rejection(_rejection_row(envelope, data))


def _run_succeeded(rows: Rows, envelope: Envelope[Any], data: RunSucceeded, trace_id: str | None) -> None:
    _run_change(rows, envelope, trace_id, "succeeded", finished_at=envelope.time, output=_json(data.output))


def _run_failed(rows: Rows, envelope: Envelope[Any], data: RunFailed, trace_id: str | None) -> None:
    _run_change(rows, envelope, trace_id, "failed", finished_at=envelope.time, error=data.reason)


def _run_cancelled(rows: Rows, envelope: Envelope[Any], data: RunCancelled, trace_id: str | None) -> None:
    _run_change(rows, envelope, trace_id, "cancelled", finished_at=envelope.time, error=data.reason)


def _step_completed(rows: Rows, envelope: Envelope[Any], data: StepCompleted, trace_id: str | None) -> None:
    # The most frequent message by far, so `_run_change` spelt out.
    values = ((_CORRELATION_ID, envelope.correlation_id), (_TRACE_ID, trace_id))
    usage = data.usage
    if not (usage.input_tokens or usage.output_tokens or data.model):
        rows.merge_run_values((envelope.tenant, envelope.entity_id), "unknown", values, _ONE_STEP)
        return
    added = (
        (_STEPS, 1),
        (_MODEL_CALLS, 1 if data.model is not None else 0),  # a real model's turn, not a scripted one
        (_INPUT_TOKENS, usage.input_tokens),
        (_OUTPUT_TOKENS, usage.output_tokens),
        (_COST, round(data.cost_usd * 1_000_000_000)),
    )
    rows.merge_run_values((envelope.tenant, envelope.entity_id), "unknown", values, added)


def _message_dead_lettered(
    rows: Rows, envelope: Envelope[Any], data: MessageDeadLettered, trace_id: str | None
) -> None:
    rows.add_dead_letter(
        DeadLetterRow(
            stream=data.stream,
            stream_seq=data.stream_seq,
            consumer=data.consumer,
            reason=data.reason,
            deliveries=data.deliveries,
            recorded_at=data.given_up_at,
            subject=data.message_subject,
            raw=base64.b64decode(data.raw) if data.raw is not None else None,
            raw_note=data.raw_note,
            event_id=envelope.id,
        )
    )


ReadModelProjector = Callable[[Rows, Envelope[Any], Any, str | None], None]

# Looked up by the payload's exact class: one dict look-up, where isinstance() on pydantic models
# (a Python-level __instancecheck__) would cost more than the rest of the row.
READ_MODELS: dict[type[Payload], ReadModelProjector] = {
    RunSubmitted: _run_submitted,
    ToolCallRequested: _tool_call_requested,
    # Kept in `events`; its decision goes to `decisions`, the turn it allowed to the run's usage.
    ModelCallRequested: lambda rows, envelope, data, trace_id: None,
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
    # A security event: kept in `events` (and shown by the timeline), changes no run.
    DecisionRefused: lambda rows, envelope, data, trace_id: None,
    # Approvals are read from `events` and `decisions` (the `approvals` view in schema.sql); a
    # pause or resume does not move a run's status, which only rises (see STATUS_RANK).
    ApprovalAnswered: lambda rows, envelope, data, trace_id: None,
    ApprovalRequested: lambda rows, envelope, data, trace_id: None,
    RunPaused: lambda rows, envelope, data, trace_id: None,
    RunResumed: lambda rows, envelope, data, trace_id: None,
    MessageDeadLettered: _message_dead_lettered,
    RunCancelled: _run_cancelled,
    # Kept in `events`; their decisions go to `decisions` (a halt's under its scope token, in run_id).
    RunCancelRequested: lambda rows, envelope, data, trace_id: None,
    HaltRequested: lambda rows, envelope, data, trace_id: None,
    HaltLiftRequested: lambda rows, envelope, data, trace_id: None,
    # Kept in `events`, bundle and all: `warden policy replay` reads a revision's files from there.
    PolicyActivated: lambda rows, envelope, data, trace_id: None,
    # The policy lifecycle and a shadow's disagreements: kept in `events`; a change's decision in
    # `decisions` (under the entity id `lifecycle`, in run_id).
    PolicyChangeRequested: lambda rows, envelope, data, trace_id: None,
    PolicyChanged: lambda rows, envelope, data, trace_id: None,
    DecisionShadowed: lambda rows, envelope, data, trace_id: None,
}
assert set(READ_MODELS) == set(PAYLOAD_TYPES), "every message type says what it adds to the read models"


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
    rules.subjects.check_envelope_subject(envelope, message.subject)
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
