"""The gate's pure decision core: a valid command and a policy verdict in, the event to record out."""

from typing import Any

from warden.ids import new_id
from warden.messages import (
    DecisionMade,
    Effect,
    Envelope,
    RunSubmitted,
    RunUsage,
    ToolCallRequested,
)

RUN_START = "run.start"
TOOL_CALL = "tool.call"


def policy_input(envelope: Envelope[Any]) -> dict[str, Any]:
    """The document the Rego policies see (see policies/README.md): who asks what, and usage so far."""
    data = envelope.data
    if isinstance(data, RunSubmitted):
        action, tool, usage = RUN_START, None, RunUsage()
    elif isinstance(data, ToolCallRequested):
        action, tool, usage = TOOL_CALL, {"name": data.tool, "arguments": data.arguments}, data.usage
    else:
        raise TypeError(f"{envelope.type} needs no decision")
    return {
        "action": action,
        "tenant": envelope.tenant,
        # For a tool call, who asked for the run: the runner carries it on the request's actor.
        "principal": envelope.actor,
        "agent": data.agent,
        "tool": tool,
        "run": {"id": envelope.subject, "usage": usage.model_dump()},
    }


def decision(
    envelope: Envelope[Any],
    *,
    request_seq: int,
    effect: Effect,
    reasons: list[str],
    policy_revision: str,
    evaluation_ms: float,
) -> DecisionMade:
    tool_call_id = envelope.data.tool_call_id if isinstance(envelope.data, ToolCallRequested) else None
    return DecisionMade(
        decision_id=new_id(),
        request_type=envelope.type,
        request_id=envelope.id,
        request_seq=request_seq,
        effect=effect,
        reasons=reasons,
        policy_revision=policy_revision,
        evaluation_ms=evaluation_ms,
        tool_call_id=tool_call_id,
    )
