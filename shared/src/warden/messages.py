"""The message contract: one envelope for every command and event, and a typed payload per type.

Each payload class names its wire `TYPE` (never its Python path), whether it is a command or an
event, and the entity it is about. `MESSAGE_TYPES` is the registry that parsing, the
subject catalogue, the JSON Schemas and the AsyncAPI document are all built from.
"""

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    model_validator,
)

from warden.decoding import MAX_SAFE_INTEGER, check_value, decode_json, may_hold_nul
from warden.errors import InvalidMessage, RejectionCode
from warden.ids import new_id

# A NATS subject token: no dots, wildcards or white space, so ids can sit inside subjects.
Token = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
TenantId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# Agent and tool names: readable identifiers that may carry a namespace ("web.fetch").
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
MessageKind = Literal["command", "event"]
# Integers stored in `integer` columns are bounded here, so every valid message fits its row; the
# rest are bounded by what every reader (the policy engine included) holds exactly.
INT32_MAX = 2**31 - 1
Count = Annotated[int, Field(ge=0, le=MAX_SAFE_INTEGER)]
StreamSeq = Annotated[int, Field(ge=1, le=MAX_SAFE_INTEGER)]


def _checked(value: Any) -> Any:
    check_value(value)  # raises InvalidMessage, which validation passes on as it is
    return value


# Free-form JSON (a run's input, a tool's arguments or result, a run's output): the decoding rules'
# limits on depth and numbers are checked here, on every path a message is validated by.
FreeJson = Annotated[JsonValue, AfterValidator(_checked)]
FreeJsonObject = Annotated[dict[str, JsonValue], AfterValidator(_checked)]
_MODEL_CONFIG = ConfigDict(frozen=True, extra="forbid")
Effect = Literal["allow", "deny", "require_approval"]


class Payload(BaseModel):
    """Base of every payload: immutable and strict, so a typo is an error, not a silent drop."""

    model_config = _MODEL_CONFIG

    TYPE: ClassVar[str]
    KIND: ClassVar[MessageKind]
    ENTITY: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1


class RunSubmitted(Payload):
    """A principal asks for a run of an agent. Published by clients; decided by the policy gate."""

    TYPE: ClassVar[str] = "run.submitted"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "run"

    agent: Name
    input: FreeJsonObject = Field(default_factory=dict)
    priority: int = Field(default=5, ge=0, le=9, description="0 is most urgent.")
    timeout_seconds: float | None = Field(default=None, gt=0, le=86_400, allow_inf_nan=False)
    labels: dict[str, str] = Field(default_factory=dict)


class RunUsage(BaseModel):
    """What a run has consumed so far, as its runner counts it; policies cap it."""

    model_config = _MODEL_CONFIG

    steps: Count = 0
    tool_calls: Count = 0
    input_tokens: Count = 0
    output_tokens: Count = 0
    model_calls: Count = 0
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="Model cost so far, in US dollars.")


class CallFact(BaseModel):
    """One earlier tool call of a run, as the policy sees it: what was called, how it ended, where it reached."""

    model_config = _MODEL_CONFIG

    tool: Name
    outcome: Literal["ok", "error", "refused"]
    host: str | None = Field(default=None, max_length=256, description="The host of its `url` argument, if any.")
    approved: bool = Field(default=False, description="It ran on a principal's approval (see approval.requested).")


class TenantUsage(BaseModel):
    """What a tenant has spent of its budget so far (the ledger's balance), as the policy sees it."""

    model_config = _MODEL_CONFIG

    tokens: Count = 0
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    tool_calls: Count = 0


# The earlier calls a request carries: a run makes at most this many steps (the runner's MAX_STEPS).
MAX_CALL_FACTS = 100


class ModelCallRequested(Payload):
    """An `llm` agent wants to call its model. Published by the agent runner; decided by the policy gate.

    A model call spends tokens and money and sends the run's conversation to an endpoint: like a
    tool call, it is made only on the gate's allow.
    """

    TYPE: ClassVar[str] = "model_call.requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "run"

    call_id: Token
    step: int = Field(ge=0, le=INT32_MAX)
    agent: Name
    model: str = Field(min_length=1, max_length=256)
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    usage: RunUsage = Field(default_factory=RunUsage, description="The run's usage before this call.")
    history: list[CallFact] = Field(
        default_factory=list, max_length=MAX_CALL_FACTS, description="The run's tool calls before this one, in order."
    )
    tenant_usage: TenantUsage | None = Field(
        default=None, description="What the tenant has spent so far, when it has a budget (see docs/budgets.md)."
    )


class ToolCallRequested(Payload):
    """An agent wants to call a tool. Published by the agent runner; decided by the policy gate."""

    TYPE: ClassVar[str] = "tool_call.requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "run"

    tool_call_id: Token
    step: int = Field(ge=0, le=INT32_MAX)
    agent: Name
    tool: Name
    arguments: FreeJsonObject = Field(default_factory=dict)
    usage: RunUsage = Field(default_factory=RunUsage, description="The run's usage before this call.")
    history: list[CallFact] = Field(
        default_factory=list, max_length=MAX_CALL_FACTS, description="The run's tool calls before this one, in order."
    )
    tool_digest: str | None = Field(
        default=None,
        max_length=128,
        description="For a tool from an MCP server: sha256 of its name, description and input schema as the "
        "server describes it now; the policy compares it with the definition that was approved.",
    )
    tenant_usage: TenantUsage | None = Field(
        default=None, description="What the tenant has spent so far, when it has a budget (see docs/budgets.md)."
    )


class CommandRejected(Payload):
    """A command was refused before anything acted on it: malformed, unknown, too large, invalid."""

    TYPE: ClassVar[str] = "command.rejected"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "command"

    code: str = Field(description="One of the stable RejectionCode values.")
    reason: str
    command_subject: str
    command_stream_seq: StreamSeq
    command_type: str | None = None
    command_id: str | None = None
    idempotency_key: str | None = None
    size_bytes: int = Field(ge=0, le=INT32_MAX)


class DecisionMade(Payload):
    """The policy gate's verdict on a run submission or a tool-call request."""

    TYPE: ClassVar[str] = "decision.made"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    decision_id: Token
    request_type: str
    request_id: str
    request_seq: StreamSeq = Field(description="Where the request sits in the commands stream.")
    effect: Effect
    reasons: list[str] = Field(default_factory=list)
    policy_revision: str
    evaluation_ms: float = Field(ge=0, allow_inf_nan=False)
    tool_call_id: Token | None = Field(
        default=None, description="The call it answers: a tool call's id, or a model call's (`call_id`)."
    )
    arguments_hash: str | None = Field(
        default=None,
        max_length=128,
        description="The hash (warden.signing.arguments_hash) of what this decision is on: a tool call's "
        "arguments, or a model call's model and output cap.",
    )
    expires_at: datetime | None = Field(default=None, description="After this, the decision may not be acted on.")
    signing_key: str | None = Field(
        default=None, max_length=128, description="The gate's public key (Ed25519, base64) that signed it."
    )
    signature: str | None = Field(
        default=None,
        max_length=256,
        description="Ed25519 signature over what binds the decision to its request (warden.signing.DecisionBinding).",
    )
    input: FreeJsonObject | None = Field(
        default=None,
        description="The policy input document the decision was made on, as the engine evaluated it, so it can be "
        "decided again with no other context (`warden policy replay`). Arguments the policy data marks secret are "
        "a hash. None when the gate decided without asking the policy, on grounds the input does not hold (an "
        "answer to a request that is not genuine or has expired, a halt filed under another scope, arguments "
        "nested too deep), and on decisions recorded before inputs were kept.",
    )
    input_hash: str | None = Field(
        default=None,
        max_length=128,
        description="warden.signing.input_hash of `input`; covered by the signature, so a signed decision proves "
        "what it was decided on.",
    )


class PolicyActivated(Payload):
    """A policy gate began deciding under a policy bundle: at start-up, or on a promote or a rollback.

    Carries the bundle's files, so that the revision every decision names can be read back, and
    evaluated again, from the audit alone. Filed under the reserved tenant `_warden`, entity
    `policy`, the revision (`sha256-<hex>`) as the entity id. Gates that activate the same revision
    for the same reason publish it under one idempotency key, so several gates make one event.
    """

    TYPE: ClassVar[str] = "policy.activated"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "policy"

    revision: str = Field(max_length=128, description="The bundle's revision (warden.policy_bundle.revision_of).")
    files: dict[str, str] = Field(
        description="The bundle: each policy file (not its tests) and data.json, by name, as UTF-8 text."
    )
    cause: Literal["start", "promote", "rollback"]
    activated_by: str = Field(
        max_length=256, description="Who caused it: the principal of a promote or rollback, else the gate."
    )
    reason: str = Field(default="", max_length=2000)
    origin: str = Field(
        max_length=1024,
        description="Where the bundle was read from: the gate's configured directory, or the lifecycle event "
        "that carried it (`events:<seq>`).",
    )
    previous_revision: str | None = Field(default=None, max_length=128, description="What it replaced, if anything.")


PolicyChange = Literal["shadow", "promote", "rollback", "withdraw"]
# Where policy change commands are filed: one entity id for the installation's policy lifecycle.
POLICY_LIFECYCLE = "lifecycle"


class PolicyChangeRequested(Payload):
    """A principal asks to change the installation's policy: load a candidate bundle as the shadow
    beside the one in force (`shadow`, with its files), put the shadow in force (`promote`), go
    back to the bundle in force before the last promote (`rollback`), or unload the shadow
    without promoting it (`withdraw`).

    Published under the reserved tenant `_warden`, entity `policy`, entity id `lifecycle`; decided
    by the gate (action `policy.change`), like any command: only a policy administrator may.
    """

    TYPE: ClassVar[str] = "policy.change_requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "policy"

    change: PolicyChange
    files: dict[str, str] | None = Field(
        default=None,
        description="For a shadow: the candidate bundle, each policy file (not its tests) and data.json by name, "
        "as UTF-8 text (warden.policy_bundle.PolicyBundle). None for any other change.",
    )
    revision: str | None = Field(
        default=None,
        max_length=128,
        description="For a shadow, the candidate's revision as its sender computed it; for a promote or a "
        "withdrawal, the shadow revision the sender means (refused if another is loaded). Optional.",
    )
    reason: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _files_only_for_a_shadow(self) -> "PolicyChangeRequested":
        if (self.change == "shadow") != (self.files is not None):
            raise ValueError("a shadow carries the candidate's files; no other change carries any")
        return self


class PolicyChanged(Payload):
    """The policy lifecycle moved: a candidate bundle was loaded as the shadow, the shadow promoted
    or withdrawn, or the bundle in force rolled back. Every gate follows these events from the stream's start,
    so every gate, a restarted or a new one too, decides under the same bundle and shadow.

    Published by the gate that allowed the change, after its decision; filed under the reserved
    tenant `_warden`, entity `policy`, the concerned revision (`sha256-<hex>`) as the entity id.
    """

    TYPE: ClassVar[str] = "policy.changed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "policy"

    change: PolicyChange
    revision: str = Field(
        max_length=128,
        description="The bundle concerned: the shadow loaded, promoted or withdrawn, or the one rolled back to.",
    )
    previous_revision: str = Field(max_length=128, description="The bundle in force when the change was decided.")
    files: dict[str, str] | None = Field(default=None, description="For a shadow: the candidate bundle's files.")
    changed_by: str = Field(max_length=256, description="The principal whose command was allowed.")
    reason: str = Field(default="", max_length=2000)
    decision_id: Token = Field(description="The gate's decision that allowed the change.")
    request_seq: StreamSeq = Field(description="Where the command sits in the commands stream.")


class DecisionShadowed(Payload):
    """The shadow bundle would have decided a live request otherwise than the bundle in force did.

    Never enforced: the live decision (`decision_id`) stands. Filed under the request's tenant,
    entity `policy`, the candidate's revision (`sha256-<hex>`) as the entity id, so one tenant's
    disagreements with one candidate are one subject filter.
    """

    TYPE: ClassVar[str] = "decision.shadowed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "policy"

    decision_id: Token = Field(description="The live decision, which stands.")
    request_type: str
    request_seq: StreamSeq
    entity_id: str = Field(max_length=128, description="What the decision is about: its run (or a halt's scope).")
    active_revision: str = Field(max_length=128)
    active_effect: Effect
    active_reasons: list[str]
    candidate_revision: str = Field(max_length=128)
    candidate_effect: Effect
    candidate_reasons: list[str]


class RunQueued(Payload):
    """The scheduler accepted an allowed run and holds it until a slot is free."""

    TYPE: ClassVar[str] = "run.queued"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    decision_id: Token
    priority: int = Field(ge=0, le=9)
    agent: Name
    request_seq: StreamSeq = Field(description="The run.submitted command's position in the commands stream.")
    decision: DecisionMade | None = Field(
        default=None, description="The gate's signed decision that allowed the run, carried on to the runner."
    )


class RunDispatched(Payload):
    """The scheduler gave the run a slot and handed it to the runners' work queue.

    The same envelope is both the audit event and the work item on `<prefix>.work.<tenant>`.
    """

    TYPE: ClassVar[str] = "run.dispatched"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    decision_id: Token
    agent: Name
    request_seq: StreamSeq = Field(description="The run.submitted command's position in the commands stream.")
    decision: DecisionMade | None = Field(
        default=None,
        description="The gate's signed decision that allowed the run: a runner starts no run without one that "
        "checks out.",
    )
    resume: Count = Field(default=0, description="0 for the run's first dispatch; n for its n-th resume after a pause.")


class ApprovalAnswered(Payload):
    """A principal approves or rejects a tool call that awaits approval. Published by clients; decided by the gate.

    The principal is the command's actor, which the server holds to the credential that sent it.
    The gate decides whether the answer counts (four eyes, the approver's roles) and records that
    as a decision on the tool call.
    """

    TYPE: ClassVar[str] = "approval.answered"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "run"

    approval_id: Token
    approval_seq: StreamSeq = Field(description="Where the approval.requested event sits in the events stream.")
    approve: bool
    reason: str = Field(default="", max_length=2000)


class ApprovalRequested(Payload):
    """A tool call waits for a human: what exactly is to be approved, by whom, until when.

    Published by the agent runner on the gate's signed `require_approval` decision, which it
    carries: the approval id is that decision's id, and the tool call, arguments hash, policy
    revision and expiry are the ones the gate signed.
    """

    TYPE: ClassVar[str] = "approval.requested"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    approval_id: Token
    tool_call_id: Token
    step: int = Field(ge=0, le=INT32_MAX)
    agent: Name
    tool: Name
    arguments: FreeJsonObject = Field(
        default_factory=dict, description="As recorded: arguments the policy data marks secret are a keyed hash."
    )
    arguments_hash: str = Field(max_length=128)
    policy_revision: str
    requested_by: str = Field(max_length=256, description="The principal who asked for the run.")
    approver_roles: list[Name] = Field(default_factory=list, max_length=64, description="Who may approve, by role.")
    expires_at: datetime
    reasons: list[str] = Field(default_factory=list)
    decision: DecisionMade = Field(description="The gate's signed require_approval decision.")


class AwaitedApproval(BaseModel):
    """One tool call a paused run waits on."""

    model_config = _MODEL_CONFIG

    approval_id: Token
    tool_call_id: Token
    expires_at: datetime


class RunPaused(Payload):
    """The runner put the run aside until its tool calls in `awaiting` are answered (or expire).

    Nothing of the run waits in memory: the runner's slot and the tenant's are free, and the
    scheduler dispatches the run again (`run.resumed`) once every awaited call is answered.
    """

    TYPE: ClassVar[str] = "run.paused"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    reason: str = Field(max_length=2000)
    awaiting: list[AwaitedApproval] = Field(min_length=1, max_length=MAX_CALL_FACTS)
    resume: Count = Field(default=0, description="The dispatch it paused in (see run.dispatched's `resume`).")


class RunResumed(Payload):
    """The scheduler queues a paused run again: its awaited calls were answered, or one expired."""

    TYPE: ClassVar[str] = "run.resumed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    reason: str = Field(max_length=2000)
    resume: int = Field(ge=1, le=MAX_SAFE_INTEGER, description="This is the run's n-th resume.")
    decision_id: Token
    priority: int = Field(ge=0, le=9)
    agent: Name
    request_seq: StreamSeq = Field(description="The run.submitted command's position in the commands stream.")
    decision: DecisionMade | None = Field(default=None, description="The gate's signed decision that allowed the run.")


class RunStarted(Payload):
    """An agent runner began executing the run."""

    TYPE: ClassVar[str] = "run.started"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    decision_id: Token
    worker: str
    attempt: int = Field(default=1, ge=1, le=MAX_SAFE_INTEGER)


class TokenUsage(BaseModel):
    """Tokens a model turn consumed."""

    model_config = _MODEL_CONFIG

    input_tokens: Count = 0
    output_tokens: Count = 0


class StepCompleted(Payload):
    """One step of the agent loop (a model turn or a tool call) finished."""

    TYPE: ClassVar[str] = "step.completed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    step: Count
    kind: Literal["model_turn", "tool_call"]
    summary: str = ""
    usage: TokenUsage = Field(default_factory=TokenUsage)
    # A real model's turn (an `llm` agent) also records what it answered: a runner that takes the
    # run over rebuilds the conversation from these, never by asking the model again.
    model: str | None = Field(default=None, max_length=256, description="The model that answered, as asked for.")
    decision_id: Token | None = Field(default=None, description="The decision that allowed the model call.")
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="From the policy data's prices.")
    finish_reason: str | None = Field(default=None, max_length=64)
    message: FreeJsonObject | None = Field(
        default=None, description="The assistant message as the model returned it: content, tool_calls, refusal."
    )


class ToolCallCompleted(Payload):
    """A tool call ended: executed (ok or error) under an allow, or refused under a deny."""

    TYPE: ClassVar[str] = "tool_call.completed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    tool_call_id: Token
    step: int = Field(ge=0, le=INT32_MAX)
    tool: Name
    decision_id: Token | None = Field(description="The decision that allowed or refused it; None if none came.")
    outcome: Literal["ok", "error", "refused"]
    result: FreeJson = None
    error: str | None = None
    host: str | None = Field(
        default=None,
        max_length=256,
        description="The host of its `url` argument, if any: where it reached (or would have).",
    )


class RunSucceeded(Payload):
    """The run finished and produced its output."""

    TYPE: ClassVar[str] = "run.succeeded"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    output: FreeJson = None
    steps: Count
    tool_calls: Count


class RunFailed(Payload):
    """The run ended without an output; `reason` says why in words a person can act on."""

    TYPE: ClassVar[str] = "run.failed"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    reason: str
    error_type: str
    steps: Count = 0


class RunCancelRequested(Payload):
    """A principal asks that one run stop: queued, it never starts; running, it ends `cancelled`.

    Published by clients; decided by the gate (action `run.cancel`). Its entity is `cancel` and its
    entity id the run's, so the decision lands on `<prefix>.evt.<tenant>.cancel.<run_id>.decision.made`,
    which the scheduler and every runner follow from sequence 1 without reading any run's events.
    """

    TYPE: ClassVar[str] = "run.cancel_requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "cancel"

    reason: str = Field(default="", max_length=2000)


class HaltRequested(Payload):
    """A principal stops every run of a tenant, or of one agent in it (the kill switch).

    Published by clients; decided by the gate (action `halt`). Its entity is `halt` and its entity
    id the scope's token (warden.controls.scope_token), so a halt and its lift share one subject.
    While the halt is in force no model or tool call in its scope starts, running runs end
    `cancelled` and queued ones are held.
    """

    TYPE: ClassVar[str] = "halt.requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "halt"

    agent: Name | None = Field(default=None, description="The agent halted; None: the whole tenant.")
    reason: str = Field(min_length=1, max_length=2000)


class HaltLiftRequested(Payload):
    """A principal lifts a halt: held runs in its scope go on. Decided by the gate (action `halt.lift`)."""

    TYPE: ClassVar[str] = "halt.lift_requested"
    KIND: ClassVar[MessageKind] = "command"
    ENTITY: ClassVar[str] = "halt"

    agent: Name | None = Field(default=None, description="The agent whose halt is lifted; None: the tenant's.")
    reason: str = Field(default="", max_length=2000)


class RunCancelled(Payload):
    """The run ended because it was cancelled or its scope halted: no call of it starts after this.

    Published by the runner (a run under way, checked before every step and call) or by the
    scheduler (a run queued, allowed or paused, which then never starts).
    """

    TYPE: ClassVar[str] = "run.cancelled"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    reason: str = Field(max_length=4000)
    decision_id: Token = Field(description="The gate's decision that cancelled the run or halted its scope.")
    control: Literal["cancel", "halt"]


class StreamGapDetected(Payload):
    """Sequences of an audited stream were missing (deleted or purged) when the audit projector reached them.

    The projection moves past them, so this event and the `stream_gaps` table are where the hole
    in the record is written down. Filed under the reserved tenant `_warden`.
    """

    TYPE: ClassVar[str] = "stream.gap_detected"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "stream"

    stream: Token
    first_seq: StreamSeq
    last_seq: StreamSeq


# Dead letters carry the raw message up to this size, so that the event, in base64 with its
# envelope, stays under the streams' 1 MiB ceiling; a larger one is named, not copied.
MAX_DEAD_LETTER_RAW_BYTES = 512 * 1024


def _decodable_base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not standard base64: {exc}") from None
    return value


Base64Text = Annotated[str, AfterValidator(_decodable_base64)]


class MessageDeadLettered(Payload):
    """A consumer gave up on a stored message: delivered as often as it allows, or terminated by it.

    Written by the audit projector from the server's advisories, and by a consumer that gives up on
    a message which then leaves its stream (an invalid work item); both use the idempotency key
    `dead-letter-<stream>-<seq>-<consumer>`, so one giving-up is one event. Filed under the reserved
    tenant `_warden`, entity `stream`, the stream's name as the entity id.
    """

    TYPE: ClassVar[str] = "message.dead_lettered"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "stream"

    stream: Token
    stream_seq: StreamSeq
    consumer: str = Field(min_length=1, max_length=256, description="The consumer that gave up on it.")
    reason: str = Field(min_length=1, max_length=2000)
    deliveries: Count | None = Field(default=None, description="How often it had been delivered to that consumer.")
    given_up_at: datetime = Field(description="When the consumer gave up: the server's advisory time, or its own.")
    message_subject: str | None = Field(default=None, max_length=1024, description="The subject it was stored on.")
    raw: Base64Text | None = Field(
        default=None,
        max_length=(MAX_DEAD_LETTER_RAW_BYTES + 2) // 3 * 4,
        json_schema_extra={"contentEncoding": "base64"},
        description="The message's bytes in standard base64, when they could be read and are at most "
        f"{MAX_DEAD_LETTER_RAW_BYTES} bytes.",
    )
    raw_note: str | None = Field(default=None, max_length=2000, description="Why `raw` is absent, if it is.")


class DecisionRefused(Payload):
    """A runner refused to act on a decision: a security event.

    The decision was unsigned, signed with a key the runner does not trust, altered or forged, or
    answers another request than the one the runner made. Nothing ran on it.
    """

    TYPE: ClassVar[str] = "decision.refused"
    KIND: ClassVar[MessageKind] = "event"
    ENTITY: ClassVar[str] = "run"

    decision_id: str = Field(max_length=256, description="As the refused decision claims it.")
    tool_call_id: Token | None = None
    reason: str = Field(max_length=2000)
    decision_seq: StreamSeq | None = Field(
        default=None, description="Where the refused decision is in the events stream, if it came from there."
    )


PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    RunSubmitted,
    ToolCallRequested,
    ModelCallRequested,
    CommandRejected,
    DecisionMade,
    RunQueued,
    RunDispatched,
    RunStarted,
    StepCompleted,
    ToolCallCompleted,
    RunSucceeded,
    RunFailed,
    StreamGapDetected,
    DecisionRefused,
    ApprovalAnswered,
    ApprovalRequested,
    RunPaused,
    RunResumed,
    MessageDeadLettered,
    RunCancelRequested,
    HaltRequested,
    HaltLiftRequested,
    RunCancelled,
    PolicyActivated,
    PolicyChangeRequested,
    PolicyChanged,
    DecisionShadowed,
)
MESSAGE_TYPES: dict[str, type[Payload]] = {model.TYPE: model for model in PAYLOAD_TYPES}

DataT = TypeVar("DataT", bound=Payload)


class Envelope(BaseModel, Generic[DataT]):
    """What travels on the wire, in the spirit of CloudEvents 1.0."""

    model_config = _MODEL_CONFIG

    id: Token = Field(description="Unique and time-sortable (UUIDv7).")
    type: str
    source: str = Field(min_length=1, max_length=128, description="The service or client that wrote it.")
    time: datetime
    tenant: TenantId
    entity_id: Token = Field(
        description="Id of the entity it is about: a run id for run events and commands, a command's stream "
        "sequence for a rejection, a stream name for a gap. Envelopes written before it was renamed carry it "
        "as `subject`; readers accept those."
    )
    correlation_id: Token
    causation_id: Token | None = None
    actor: str = Field(min_length=1, max_length=256, description="Who asked: a principal or a service.")
    schema_version: int = Field(default=1, ge=1, le=MAX_SAFE_INTEGER)
    data: DataT

    @model_validator(mode="after")
    def _type_names_payload(self) -> "Envelope[DataT]":
        # The type is how readers pick the payload model, so it must never disagree with it.
        if self.type != self.data.TYPE:
            raise ValueError(f"type {self.type!r} does not match its {self.data.TYPE!r} payload")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


# One concrete envelope class per type, built once: validation then needs no dispatch at run time.
ENVELOPE_TYPES: dict[str, type[Envelope[Any]]] = {
    type_name: Envelope[model]  # type: ignore[valid-type]
    for type_name, model in MESSAGE_TYPES.items()
}


def make_envelope(
    data: DataT,
    *,
    tenant: str,
    entity_id: str,
    actor: str,
    source: str,
    caused_by: Envelope[Any] | None = None,
) -> Envelope[DataT]:
    """Wrap a payload, carrying the correlation id forward from the message that caused it."""
    event_id = new_id()
    envelope = ENVELOPE_TYPES[data.TYPE](
        id=event_id,
        type=data.TYPE,
        source=source,
        time=datetime.now(UTC),
        tenant=tenant,
        entity_id=entity_id,
        correlation_id=caused_by.correlation_id if caused_by else event_id,
        causation_id=caused_by.id if caused_by else None,
        actor=actor,
        schema_version=data.SCHEMA_VERSION,
        data=data,
    )
    return cast("Envelope[DataT]", envelope)


Upcaster = Any  # Callable[[dict[str, Any]], dict[str, Any]]: raw `data` of version v to v + 1.
# (type, version) -> function lifting that version's raw data one version up. Stored events are
# never rewritten: old versions are lifted on read, here, before validation.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def _upcast_envelope(document: dict[str, Any]) -> dict[str, Any]:
    """Lift an envelope written before its `subject` field was renamed `entity_id`.

    The field names the entity a message is about, and beside NATS subjects the old name misled
    every reader. It is the envelope's own field, so no payload's schema_version moved; stored
    messages are never rewritten, so old ones are lifted here, on read.
    """
    if "subject" not in document or "entity_id" in document:
        return document
    lifted = {key: value for key, value in document.items() if key != "subject"}
    lifted["entity_id"] = document["subject"]
    return lifted


def _upcast(document: dict[str, Any], model: type[Payload]) -> dict[str, Any]:
    version = document.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise InvalidMessage(RejectionCode.SCHEMA_INVALID, "schema_version must be a positive integer")
    if version > model.SCHEMA_VERSION:
        raise InvalidMessage(
            RejectionCode.SCHEMA_INVALID,
            f"{model.TYPE} schema_version {version} is newer than this reader's {model.SCHEMA_VERSION}",
        )
    while version < model.SCHEMA_VERSION:
        upcaster = UPCASTERS.get((model.TYPE, version))
        if upcaster is None:
            raise InvalidMessage(
                RejectionCode.SCHEMA_INVALID, f"no upcaster for {model.TYPE} from schema_version {version}"
            )
        document = {**document, "data": upcaster(document.get("data")), "schema_version": version + 1}
        version += 1
    return document


def describe_validation_error(error: ValidationError, limit: int = 5) -> str:
    """Compress pydantic's report into one line a client can act on: `field.path: message; ...`."""
    parts = []
    for item in error.errors()[:limit]:
        location = ".".join(str(part) for part in item["loc"]) or "(message)"
        parts.append(f"{location}: {item['msg']}")
    if error.error_count() > limit:
        parts.append(f"... and {error.error_count() - limit} more")
    return "; ".join(parts)


def decode_document(raw: bytes, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Bytes to a JSON object under Warden's decoding rules (warden.decoding), or `InvalidMessage` saying why not."""
    document = decode_json(raw, max_bytes=max_bytes)
    if type(document) is not dict:
        raise InvalidMessage(RejectionCode.SCHEMA_INVALID, "body must be a JSON object (an envelope)")
    return document


def validate_document(document: dict[str, Any]) -> Envelope[Any]:
    """A decoded JSON object to a typed envelope (upcast first), or `InvalidMessage` saying why not."""
    type_name = document.get("type")
    if not isinstance(type_name, str):
        raise InvalidMessage(RejectionCode.SCHEMA_INVALID, "envelope has no string field 'type'")
    envelope_type = ENVELOPE_TYPES.get(type_name)
    if envelope_type is None:
        raise InvalidMessage(RejectionCode.UNKNOWN_TYPE, f"unknown message type {type_name!r}")
    document = _upcast(_upcast_envelope(document), MESSAGE_TYPES[type_name])
    try:
        return envelope_type.model_validate(document)
    except ValidationError as exc:
        raise InvalidMessage(RejectionCode.SCHEMA_INVALID, describe_validation_error(exc)) from None


def parse_envelope(raw: bytes, *, max_bytes: int | None = None, type_hint: str | None = None) -> Envelope[Any]:
    """Validate raw bytes into a typed envelope, or raise `InvalidMessage` saying exactly why not.

    `type_hint` (a message's `Warden-Type` header) lets pydantic-core parse and validate the bytes
    in one pass, about twice as fast. A hint is only a hint: when that pass fails, or the message
    is of an older schema version that needs upcasting, the bytes take the full path, which finds
    the type in the body and gives the precise error. So does a message that might hold a NUL,
    which the one-pass parse does not look for in typed strings.
    """
    fast = ENVELOPE_TYPES.get(type_hint) if type_hint is not None else None
    if fast is not None and (max_bytes is None or len(raw) <= max_bytes) and not may_hold_nul(raw):
        try:
            envelope = fast.model_validate_json(raw)
        except ValidationError:
            pass
        else:
            if envelope.schema_version == envelope.data.SCHEMA_VERSION:
                return envelope
    return validate_document(decode_document(raw, max_bytes=max_bytes))
