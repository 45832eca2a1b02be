"""The gate's decision core: a valid command in, the decision to record out.

The rules that do not need Rego live here, beside the call to it: an unknown tool or agent is
denied before any policy runs, and the gate fails closed (an evaluation error, or one over its
time budget, is a deny with the reason).

Every decision records the input document it was made on (`DecisionMade.input`), exactly as the
engine evaluated it, or would have for a decision made before any policy ran, and signs its hash:
`warden policy replay` evaluates it again under another bundle with no other context. A secret
argument (one the policy data marks secret) reaches the gate concealed by the runner; one that
arrives in clear anyway is replaced, before the engine sees it, by the gate's own keyed hash
(`CLEAR_SECRET_PREFIX`), which the policy refuses as it refuses the clear value, so the value is
in no decision, and the recorded input is still what was evaluated.
"""

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from warden.controls import CONTROL_TYPES, control_hash, scope_token
from warden.decoding import MAX_DEPTH
from warden.ids import new_id
from warden.messages import (
    ApprovalAnswered,
    ApprovalRequested,
    DecisionMade,
    Effect,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    ModelCallRequested,
    PolicyChangeRequested,
    RunCancelRequested,
    RunSubmitted,
    RunUsage,
    ToolCallRequested,
)
from warden.policy_gate.engine import PolicyEngine, PolicyEvaluationError
from warden.secret_arguments import is_concealed
from warden.signing import (
    DecisionBinding,
    DecisionSigner,
    DecisionVerifier,
    arguments_hash,
    bound_arguments,
    input_hash,
)

# A decision that took longer than this is a deny: the gate fails closed.
POLICY_BUDGET_MS = 1000
RUN_START = "run.start"
TOOL_CALL = "tool.call"
MODEL_CALL = "model.call"
APPROVAL_ANSWER = "approval.answer"
RUN_CANCEL = "run.cancel"
HALT = "halt"
HALT_LIFT = "halt.lift"
POLICY_CHANGE = "policy.change"
# How deep a tool call's arguments may nest and still be recorded in its decision's input, inside
# every event that carries that decision (an approval request: envelope, data, decision, input,
# tool, arguments), under the decoding rules' limit on a whole message. Deeper ones are denied
# before any policy runs, with no input: fail closed, rather than a decision no reader could read.
MAX_RECORDED_ARGUMENT_DEPTH = MAX_DEPTH - 8
ARGUMENTS_TOO_DEEP = (
    f"the tool call's arguments nest more than {MAX_RECORDED_ARGUMENT_DEPTH} levels deep: too deep to record "
    "with its decision (fail closed)"
)
# The form a secret argument that arrived in clear takes in the input: not the runner's concealed
# form (`hmac-sha256:`), so the policy still refuses it as "arrived in clear".
CLEAR_SECRET_PREFIX = "gate-hmac-sha256:"
_CONTROL_ACTIONS = {RunCancelRequested.TYPE: RUN_CANCEL, HaltRequested.TYPE: HALT, HaltLiftRequested.TYPE: HALT_LIFT}


def control_input(envelope: Envelope[Any]) -> dict[str, Any]:
    """The policy input for a cancel, a halt or a lift: who asks to stop what (see policies/controls.rego)."""
    data = envelope.data
    agent = data.agent if isinstance(data, HaltRequested | HaltLiftRequested) else None
    control: dict[str, Any] = {"reason": data.reason}
    if isinstance(data, HaltRequested | HaltLiftRequested):
        control["scope"] = "agent" if agent is not None else "tenant"
    return {
        "action": _CONTROL_ACTIONS[envelope.type],
        "tenant": envelope.tenant,
        "principal": envelope.actor,
        "agent": agent,
        "tool": None,
        "model": None,
        "control": control,
        "run": {"id": envelope.entity_id} if isinstance(data, RunCancelRequested) else None,
    }


def policy_change_input(envelope: Envelope[Any]) -> dict[str, Any]:
    """The policy input for a change of the installation's policy: who asks for which change (see
    policies/policy.rego). The bundle itself is not in it: whether a candidate loads is the gate's
    judgement, made after the policy's (see `PolicyDecider.decide`)."""
    data = envelope.data
    assert isinstance(data, PolicyChangeRequested)
    return {
        "action": POLICY_CHANGE,
        "tenant": envelope.tenant,
        "principal": envelope.actor,
        "agent": None,
        "tool": None,
        "model": None,
        "run": None,
        "policy": {"change": data.change, "revision": data.revision, "reason": data.reason},
    }


def control_summary(envelope: Envelope[Any]) -> str:
    """The first reason of an allow on a control: what a cancelled run's record says of it."""
    return control_summary_of(control_input(envelope))


def nesting(value: Any) -> int:
    """How many arrays and objects deep `value` nests (0 for a scalar)."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            pending.extend((member, depth + 1) for member in (item.values() if isinstance(item, dict) else item))
    return deepest


def policy_input(envelope: Envelope[Any], approval: ApprovalRequested | None = None) -> dict[str, Any]:
    """The document the Rego policies see (see policies/README.md): who asks what, and usage so far.

    For an answer to an approval request, `approval` is that request: the principal is who
    answers, and the tool, its arguments and who asked for the run are the request's.
    """
    data = envelope.data
    if isinstance(data, ApprovalAnswered):
        if approval is None:
            raise TypeError("an answer is judged with the approval request it answers")
        return {
            "action": APPROVAL_ANSWER,
            "tenant": envelope.tenant,
            "principal": envelope.actor,
            "agent": approval.agent,
            "tool": {"name": approval.tool, "arguments": approval.arguments},
            "model": None,
            "approval": {
                "id": approval.approval_id,
                "requested_by": approval.requested_by,
                "approve": data.approve,
                "reason": data.reason,
            },
            "run": {"id": envelope.entity_id},
        }
    model = None
    # What the run did before this request: its earlier tool calls (the runner's record of them).
    earlier = data.history if isinstance(data, ToolCallRequested | ModelCallRequested) else []
    history = [fact.model_dump() for fact in earlier]
    tool: dict[str, Any] | None
    if isinstance(data, RunSubmitted):
        action, tool, usage = RUN_START, None, RunUsage()
    elif isinstance(data, ToolCallRequested):
        action, tool, usage = TOOL_CALL, {"name": data.tool, "arguments": data.arguments}, data.usage
        if data.tool_digest is not None:
            tool["digest"] = data.tool_digest
    elif isinstance(data, ModelCallRequested):
        action, tool, usage = MODEL_CALL, None, data.usage
        model = {"name": data.model, "max_output_tokens": data.max_output_tokens}
    else:
        raise TypeError(f"{envelope.type} needs no decision")
    tenant_usage = data.tenant_usage if isinstance(data, ToolCallRequested | ModelCallRequested) else None
    return {
        "action": action,
        "tenant": envelope.tenant,
        # What the tenant has spent of its budget (null when it has none).
        "tenant_usage": tenant_usage.model_dump() if tenant_usage is not None else None,
        # For a tool or model call, who asked for the run: the runner carries it on the request's actor.
        "principal": envelope.actor,
        "agent": data.agent,
        "tool": tool,
        "model": model,
        "run": {"id": envelope.entity_id, "usage": usage.model_dump(), "history": {"tool_calls": history}},
    }


def decision(
    envelope: Envelope[Any],
    signer: DecisionSigner,
    *,
    request_seq: int,
    effect: Effect,
    reasons: list[str],
    policy_revision: str,
    evaluation_ms: float,
    expires_at: datetime | None = None,
    approval: ApprovalRequested | None = None,
    input_document: dict[str, Any] | None = None,
) -> DecisionMade:
    """The decision on one request, signed over what binds it to that request (see warden.signing).

    A decision on an answer to an approval request is a decision on the tool call it approves:
    it names that call and its arguments hash, and expires with the request. `input_document`:
    the policy input it was made on, recorded and bound by its hash.
    """
    data = envelope.data
    call_id = None
    bound_hash = None
    if envelope.type in CONTROL_TYPES:
        bound_hash = control_hash(envelope.type, envelope.entity_id)
    if isinstance(data, ToolCallRequested):
        call_id = data.tool_call_id
    elif isinstance(data, ModelCallRequested):
        call_id = data.call_id
    if call_id is not None:
        bound_hash = arguments_hash(bound_arguments(data))
    if approval is not None:
        call_id, bound_hash = approval.tool_call_id, approval.arguments_hash
    unsigned = DecisionMade(
        decision_id=new_id(),
        request_type=envelope.type,
        request_id=envelope.id,
        request_seq=request_seq,
        effect=effect,
        reasons=reasons,
        policy_revision=policy_revision,
        evaluation_ms=evaluation_ms,
        tool_call_id=call_id,
        arguments_hash=bound_hash,
        expires_at=expires_at,
    )
    if input_document is not None:
        # Copied in, not validated again: it is made of the command's fields, validated when the
        # command was read, and validating it as free-form JSON would cost more than the decision.
        unsigned = unsigned.model_copy(update={"input": input_document, "input_hash": input_hash(input_document)})
    signature = signer.sign(DecisionBinding.of(unsigned, envelope.tenant, envelope.entity_id))
    return unsigned.model_copy(update={"signing_key": signer.public_key, "signature": signature})


@dataclass(frozen=True)
class Judgement:
    """What one policy engine makes of one request: the effect, why, and the input it was made on."""

    effect: Effect
    reasons: list[str]
    input: dict[str, Any] | None
    expires_at: datetime | None = None
    # For an answer to a genuine approval request: that request, whose call the decision binds.
    approves: ApprovalRequested | None = None


class PolicyDecider:
    """Evaluates policies in line, on the event loop's thread.

    A worker thread would cost a GIL hand-off per decision (milliseconds while the loop is busy)
    to guard against a slow policy, and Rego evaluation always terminates: so the budget is
    enforced after the fact instead. A decision that took longer than the budget is a deny.

    `engine` is the bundle in force; replacing it (a promote, a rollback) takes effect from the
    next decision: each decision reads it once, so it is made, and names, one revision.
    """

    def __init__(self, engine: PolicyEngine, signer: DecisionSigner, verifier: DecisionVerifier | None = None) -> None:
        self.engine = engine
        self.signer = signer
        # The keys an approval request's decision may be signed with: the gate's own, and any
        # still trusted after a rotation.
        self.verifier = verifier or DecisionVerifier([signer.public_key])
        # Keys the hash of a secret that arrived in clear: a plain hash of a short secret could be
        # guessed back by trying candidates. Derived from the signing key, which only gates hold.
        self._clear_secret_key = hmac.new(bytes(signer.key), b"warden: clear secret arguments", hashlib.sha256).digest()

    def decide(
        self,
        envelope: Envelope[Any],
        request_seq: int,
        approval: ApprovalRequested | str | None = None,
        *,
        refusal: Callable[[], str | None] | None = None,
    ) -> DecisionMade:
        """The decision on one command; for an answer to an approval request, `approval` is the
        request it names as read from the events stream, or why it could not be read.

        `refusal`: asked only once the policy allows, why the gate cannot carry the command out
        (a policy change the lifecycle cannot make: a candidate that does not load, no shadow to
        promote), or None. So one who may not change policy is told that, and no candidate is
        loaded for them; an allow it refuses becomes a deny with that reason and no input (the
        input does not hold it).
        """
        engine = self.engine
        started = time.perf_counter()
        judged = self.judge(engine, envelope, approval)
        if judged.effect == "allow" and refusal is not None and (refused := refusal()) is not None:
            judged = Judgement("deny", [refused], None)
        return decision(
            envelope,
            self.signer,
            request_seq=request_seq,
            effect=judged.effect,
            reasons=judged.reasons,
            policy_revision=engine.revision,
            evaluation_ms=round((time.perf_counter() - started) * 1000, 3),
            expires_at=judged.expires_at,
            approval=judged.approves,
            input_document=judged.input,
        )

    def judge(
        self, engine: PolicyEngine, envelope: Envelope[Any], approval: ApprovalRequested | str | None = None
    ) -> Judgement:
        """What `engine` decides on one command, unsigned: the enforced decision, or a shadow's."""
        if isinstance(envelope.data, ApprovalAnswered):
            return self._judge_answer(engine, envelope, approval)
        if envelope.type in CONTROL_TYPES:
            return self._judge_control(engine, envelope)
        if isinstance(envelope.data, PolicyChangeRequested):
            document = policy_change_input(envelope)
            effect, reasons = judge_input(engine, document)
            return Judgement(effect, list(reasons), document)
        return self._judge_request(engine, envelope)

    def _judge_request(self, engine: PolicyEngine, envelope: Envelope[Any]) -> Judgement:
        """A run's start, a tool call or a model call."""
        data = envelope.data
        if isinstance(data, ToolCallRequested) and nesting(data.arguments) > MAX_RECORDED_ARGUMENT_DEPTH:
            return Judgement("deny", [ARGUMENTS_TOO_DEEP], None)
        document = self.without_clear_secrets(engine, policy_input(envelope))
        effect, reasons = judge_input(engine, document)
        # A call that needs a human waits for one only so long: the runner refuses it after this.
        expires_at = (
            datetime.now(UTC) + timedelta(seconds=engine.approval_expiry_seconds)
            if effect == "require_approval"
            else None
        )
        return Judgement(effect, list(reasons), document, expires_at)

    def _judge_control(self, engine: PolicyEngine, envelope: Envelope[Any]) -> Judgement:
        """A cancel, a halt or a lift; an allow's first reason says what it does.

        A halt is filed under its scope's token: one that names another scope than the token it is
        sent under is denied, so a halt of one agent cannot be passed off as the tenant's.
        """
        data = envelope.data
        if isinstance(data, HaltRequested | HaltLiftRequested) and envelope.entity_id != scope_token(data.agent):
            misfiled = (
                f"a halt of {data.agent or 'the tenant'} is filed under {scope_token(data.agent)!r}, "
                f"not {envelope.entity_id!r}"
            )
            return Judgement("deny", [misfiled], None)
        document = control_input(envelope)
        effect, reasons = judge_input(engine, document)
        return Judgement(effect, list(reasons), document)

    def _judge_answer(
        self, engine: PolicyEngine, envelope: Envelope[Any], approval: ApprovalRequested | str | None
    ) -> Judgement:
        """The decision on an answer to an approval request: a decision on the tool call it answers.

        - allow: the answer counts and approves: the call may run (if, when it is about to, the
          decision has not expired and names the call's arguments and policy revision);
        - deny: the answer counts and rejects, or it came after the request expired;
        - require_approval: the answer does not count (the policy says why: four eyes, roles);
          the call still waits for one that does.

        An answer that names no genuine approval request is denied bound to no call; its input is
        the one it would have been judged on, or None when no request could be read at all.
        """
        answer = envelope.data
        assert isinstance(answer, ApprovalAnswered)
        if not isinstance(approval, ApprovalRequested):
            return Judgement("deny", [approval or "the answer names no approval request"], None)
        document = self.without_clear_secrets(engine, policy_input(envelope, approval))
        problem = self._not_genuine(approval, envelope)
        if problem is not None:
            return Judgement("deny", [problem], None)
        if approval.expires_at <= datetime.now(UTC):
            verb = "approved" if answer.approve else "rejected"
            late = f"{verb} by {envelope.actor} after the request expired at {approval.expires_at.isoformat()}"
            return Judgement("deny", [late], None, approval.expires_at, approval)
        effect, reasons = judge_input(engine, document)
        return Judgement(effect, list(reasons), document, approval.expires_at, approval)

    def without_clear_secrets(self, engine: PolicyEngine, document: dict[str, Any]) -> dict[str, Any]:
        """`document` with every secret tool argument that is not concealed replaced by the gate's
        keyed hash of it (see the module's docstring); the same document when there is none."""
        tool = document.get("tool")
        if not isinstance(tool, dict):
            return document
        secret = engine.secret_arguments.get(tool["name"], frozenset())
        arguments: Mapping[str, Any] = tool.get("arguments") or {}
        clear = [name for name in secret if name in arguments and not is_concealed(arguments[name])]
        if not clear:
            return document
        hidden = {name: self._clear_secret_digest(arguments[name]) for name in clear}
        return {**document, "tool": {**tool, "arguments": {**arguments, **hidden}}}

    def _clear_secret_digest(self, value: Any) -> str:
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return CLEAR_SECRET_PREFIX + hmac.new(self._clear_secret_key, canonical.encode(), hashlib.sha256).hexdigest()

    def _not_genuine(self, approval: ApprovalRequested, answer: Envelope[Any]) -> str | None:
        """Why an approval request is not one to answer (None: it is): it must carry this gate's
        signed require_approval decision, and say what that decision binds."""
        signed = approval.decision
        refusal = self.verifier.refusal(signed, answer.tenant, answer.entity_id)
        if refusal is not None:
            return f"approval request {approval.approval_id} does not carry a decision of the gate's ({refusal})"
        binds = (signed.effect, signed.decision_id, signed.tool_call_id, signed.arguments_hash, signed.policy_revision)
        claims = (
            "require_approval",
            approval.approval_id,
            approval.tool_call_id,
            approval.arguments_hash,
            approval.policy_revision,
        )
        if binds != claims or signed.expires_at != approval.expires_at:
            return f"approval request {approval.approval_id} says other than the decision it carries"
        return None


def _said(reason: object) -> str:
    return f": {reason}" if reason else ""


def control_summary_of(document: Mapping[str, Any]) -> str:
    """`control_summary` from a control's policy input (see `control_input`), which holds all it says."""
    actor, control = document.get("principal"), document.get("control") or {}
    said = _said(control.get("reason"))
    if document.get("action") == RUN_CANCEL:
        return f"cancelled by {actor}{said}"
    agent, tenant = document.get("agent"), document.get("tenant")
    scope = f"agent {agent} of tenant {tenant}" if agent else f"tenant {tenant}"
    verb = "halted" if document.get("action") == HALT else "halt lifted"
    return f"{scope} {verb} by {actor}{said}"


def judge_input(engine: PolicyEngine, document: Mapping[str, Any]) -> tuple[Effect, tuple[str, ...]]:
    """The gate's decision on one policy input, from the input alone: the Rego decision, with the
    rules the gate adds around it (an unknown agent or tool is denied before any policy runs; an
    evaluation error is a deny; a stop is never put off for approval; an answer to an approval
    request counts only if the policy allows it). `warden policy replay` re-decides recorded
    inputs with it, so what a candidate bundle is judged by is what the gate would do.

    What is not in the input is left to the caller: the time budget, an answer's expiry, the
    genuineness of the request it answers, a halt filed under another scope.
    """
    action = document.get("action")
    effect: Effect
    try:
        tool_name, agent = (document.get("tool") or {}).get("name"), document.get("agent")
        if action == TOOL_CALL and not (isinstance(tool_name, str) and engine.knows_tool(tool_name)):
            return "deny", (f"unknown tool {tool_name!r}: it is not in the policy data's tool catalogue",)
        if action == RUN_START and not (isinstance(agent, str) and engine.knows_agent(agent)):
            return "deny", (f"unknown agent {agent!r}: it is not in the policy data's agent catalogue",)
        result = engine.evaluate(document)
        effect, reasons = result.effect, result.reasons
        if action in (RUN_START, TOOL_CALL, MODEL_CALL) and result.evaluation_ms > POLICY_BUDGET_MS:
            took = f"policy evaluation took {result.evaluation_ms:.0f} ms, over the {POLICY_BUDGET_MS} ms budget"
            return "deny", (f"{took} (fail closed)",)
    except PolicyEvaluationError as exc:
        failed = ((f"policy evaluation failed (fail closed): {exc}"),)
        if action == APPROVAL_ANSWER:
            return "require_approval", (_DOES_NOT_COUNT.format(actor=document.get("principal")), *failed)
        return "deny", failed
    if action in _CONTROL_ACTIONS.values():
        if effect == "require_approval":
            effect = "deny"
        if effect == "allow":
            reasons = (control_summary_of(document), *reasons)
        return effect, reasons
    if action == APPROVAL_ANSWER:
        answer = document.get("approval") or {}
        if effect != "allow":
            return "require_approval", (_DOES_NOT_COUNT.format(actor=document.get("principal")), *reasons)
        verb = "approved" if answer.get("approve") else "rejected"
        said = f"{verb} by {document.get('principal')}{_said(answer.get('reason'))}"
        return ("allow" if answer.get("approve") else "deny"), (said, *reasons)
    return effect, reasons


_DOES_NOT_COUNT = "the answer of {actor} does not count; the call still awaits approval"
