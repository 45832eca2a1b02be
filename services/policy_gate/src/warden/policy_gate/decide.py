"""The gate's decision core: a valid command in, the decision to record out.

The rules that do not need Rego live here, beside the call to it: an unknown tool or agent is
denied before any policy runs, and the gate fails closed (an evaluation error, or one over its
time budget, is a deny with the reason).
"""

import time
from typing import Any

from warden.ids import new_id
from warden.messages import (
    DecisionMade,
    Effect,
    Envelope,
    ModelCallRequested,
    RunSubmitted,
    RunUsage,
    ToolCallRequested,
)
from warden.policy_gate.engine import PolicyEngine, PolicyEvaluationError
from warden.signing import DecisionBinding, DecisionSigner, arguments_hash, bound_arguments

# A decision that took longer than this is a deny: the gate fails closed.
POLICY_BUDGET_MS = 1000
RUN_START = "run.start"
TOOL_CALL = "tool.call"
MODEL_CALL = "model.call"


def policy_input(envelope: Envelope[Any]) -> dict[str, Any]:
    """The document the Rego policies see (see policies/README.md): who asks what, and usage so far."""
    data = envelope.data
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
    return {
        "action": action,
        "tenant": envelope.tenant,
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
) -> DecisionMade:
    """The decision on one request, signed over what binds it to that request (see warden.signing)."""
    data = envelope.data
    call_id = None
    if isinstance(data, ToolCallRequested):
        call_id = data.tool_call_id
    elif isinstance(data, ModelCallRequested):
        call_id = data.call_id
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
        arguments_hash=arguments_hash(bound_arguments(data)) if call_id is not None else None,
    )
    signature = signer.sign(DecisionBinding.of(unsigned, envelope.tenant, envelope.entity_id))
    return unsigned.model_copy(update={"signing_key": signer.public_key, "signature": signature})


class PolicyDecider:
    """Evaluates policies in line, on the event loop's thread.

    A worker thread would cost a GIL hand-off per decision (milliseconds while the loop is busy)
    to guard against a slow policy, and Rego evaluation always terminates: so the budget is
    enforced after the fact instead. A decision that took longer than the budget is a deny.
    """

    def __init__(self, engine: PolicyEngine, signer: DecisionSigner) -> None:
        self.engine = engine
        self.signer = signer

    def decide(self, envelope: Envelope[Any], request_seq: int) -> DecisionMade:
        started = time.perf_counter()
        data = envelope.data
        effect: Effect
        reasons: list[str]
        try:
            if isinstance(data, ToolCallRequested) and not self.engine.knows_tool(data.tool):
                effect, reasons = "deny", [f"unknown tool {data.tool!r}: it is not in the policy data's tool catalogue"]
            elif isinstance(data, RunSubmitted) and not self.engine.knows_agent(data.agent):
                effect, reasons = (
                    "deny",
                    [f"unknown agent {data.agent!r}: it is not in the policy data's agent catalogue"],
                )
            else:
                result = self.engine.evaluate(policy_input(envelope))
                effect, reasons = result.effect, list(result.reasons)
                if result.evaluation_ms > POLICY_BUDGET_MS:
                    effect = "deny"
                    reasons = [
                        f"policy evaluation took {result.evaluation_ms:.0f} ms, over the {POLICY_BUDGET_MS} ms "
                        "budget (fail closed)"
                    ]
        except PolicyEvaluationError as exc:
            effect, reasons = "deny", [f"policy evaluation failed (fail closed): {exc}"]
        elapsed_ms = (time.perf_counter() - started) * 1000
        return decision(
            envelope,
            self.signer,
            request_seq=request_seq,
            effect=effect,
            reasons=reasons,
            policy_revision=self.engine.revision,
            evaluation_ms=round(elapsed_ms, 3),
        )
