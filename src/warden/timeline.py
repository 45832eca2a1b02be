"""A run's story told from the audit tables: who asked, each decision, each step, the result."""

import json
from typing import Any

from pydantic import ValidationError

from warden.messages import DecisionMade
from warden.read_model import Database, run_events
from warden.settings import Settings
from warden.signing import DecisionVerifier, SigningKeyError


async def run_timeline(db: Database, tenant: str, run_id: str, verifier: DecisionVerifier | None = None) -> list[str]:
    """Lines describing the run, in the order the server stored its messages, from the `events` table.

    Each line starts with the time the server stored the message, then the time the sender
    claimed (with its date when that is another day). With the trusted decision keys
    (`verifier`), each decision's signature is checked as the runners check it, so a decision
    the gate did not sign reads as such, not as the gate's; without them it says it was not checked.
    """
    lines = []
    turns, called, input_tokens, output_tokens, cost = 0, 0, 0, 0, 0.0
    for event in await run_events(db, tenant, run_id):
        if event.type == "step.completed" and event.data.get("kind") == "model_turn":
            usage = event.data.get("usage", {})
            turns += 1
            called += bool(event.data.get("model"))
            input_tokens += usage.get("input_tokens", 0)
            output_tokens += usage.get("output_tokens", 0)
            cost += event.data.get("cost_usd", 0.0)
        stored, claimed = event.stored_at, event.sent_at
        claimed_format = "%H:%M:%S.%f" if claimed.date() == stored.date() else "%Y-%m-%d %H:%M:%S.%f"
        times = f"{stored:%H:%M:%S.%f}"[:-3] + " (sent " + f"{claimed:{claimed_format}}"[:-3] + ")"
        if event.type == "decision.made":
            described = _decision(event.data, tenant, run_id, verifier)
        else:
            described = _describe(event.type, event.actor, event.data)
        lines.append(f"{times}  {described}")
    if called:
        lines.append(
            f"usage: {turns} model turns, {input_tokens} input + {output_tokens} output tokens, {cost:.6f} USD"
        )
    elif input_tokens or output_tokens:
        lines.append(
            f"usage: {turns} scripted model turns, {input_tokens} input + {output_tokens} output tokens "
            "(as the script declares them: no model was called)"
        )
    return lines


def _decision(data: dict[str, Any], tenant: str, run_id: str, verifier: DecisionVerifier | None) -> str:
    call = {"model_call.requested": "model call", "approval.answered": "answer on tool call"}.get(
        data.get("request_type", ""), "tool call"
    )
    what = f"{call} {data['tool_call_id']}" if data.get("tool_call_id") else "the run"
    if data.get("request_type") == "run.cancel_requested":
        what = "the cancel of the run"
    told = (
        f"{data['effect'].upper()} {what} ({'; '.join(data['reasons'])}) "
        f"[policy {data['policy_revision']}, {data['evaluation_ms']} ms, decision {data['decision_id']}"
    )
    if verifier is None:
        return f"policy gate: {told}, signature not checked]"
    try:
        refusal = verifier.refusal(DecisionMade.model_validate(data), tenant, run_id)
    except ValidationError:
        refusal = "not a decision the gate could have made"
    if refusal is None:
        return f"policy gate: {told}, signed]"
    return f"SECURITY: NOT THE GATE'S ({refusal}): {told}]"


def trusted_keys(settings: Settings) -> DecisionVerifier | None:
    """The decision keys this installation trusts, if this machine holds them (the stack's own, or
    WARDEN_DECISION_KEYS_FILE); None: decisions are shown unchecked."""
    try:
        return DecisionVerifier.from_file(settings.trusted_keys_path())
    except SigningKeyError:
        return None


def _describe_approval(type_name: str, actor: str, data: dict[str, Any]) -> str | None:
    """A line for the messages of an approval: asked, the run paused, answered, the run resumed."""
    match type_name:
        case "approval.requested":
            return (
                f"runner: tool call {data['tool_call_id']} ({data['tool']} {json.dumps(data['arguments'])}) awaits "
                f"approval {data['approval_id']} by a principal with role [{', '.join(data['approver_roles'])}], "
                f"not {data['requested_by']}, until {data['expires_at']}"
            )
        case "run.paused":
            return f"runner: run paused, its slot freed ({data['reason']})"
        case "approval.answered":
            verb = "APPROVES" if data["approve"] else "REJECTS"
            said = f": {data['reason']}" if data.get("reason") else ""
            return f"{actor} {verb} approval {data['approval_id']}{said}"
        case "run.resumed":
            return f"scheduler: resumed ({data['reason']})"
    return None


def _describe(type_name: str, actor: str, data: dict[str, Any]) -> str:
    return (
        _describe_approval(type_name, actor, data)
        or _describe_stop(type_name, actor, data)
        or _describe_run(type_name, actor, data)
    )


def _describe_stop(type_name: str, actor: str, data: dict[str, Any]) -> str | None:
    match type_name:
        case "run.cancel_requested":
            said = f": {data['reason']}" if data.get("reason") else ""
            return f"{actor} asks that the run be cancelled{said}"
        case "run.cancelled":
            return f"run CANCELLED ({data['control']}, decision {data['decision_id']}): {data['reason']}"
    return None


def _describe_run(type_name: str, actor: str, data: dict[str, Any]) -> str:
    match type_name:
        case "run.submitted":
            return f"{actor} asked for a run of agent {data['agent']} with input {json.dumps(data['input'])}"
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
        case "model_call.requested":
            usage = data.get("usage", {})
            spent = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
            return (
                f"agent asks to call model {data['model']} (so far {spent} tokens, {usage.get('cost_usd', 0):.6f} USD)"
            )
        case "step.completed" if data.get("model"):
            usage = data.get("usage", {})
            spent = f"{usage.get('input_tokens', 0)} in + {usage.get('output_tokens', 0)} out tokens"
            return (
                f"step {data['step']}: model turn of {data['model']}: {spent}, {data.get('cost_usd', 0):.6f} USD: "
                f"{data.get('summary', '')}"
            )
        case "step.completed":
            return f"step {data['step']}: {data['kind']}: {data.get('summary', '')}"
        case "run.succeeded":
            # Counted as `warden runs` counts them: model turns and tool calls, apart.
            turns = data["steps"] - data["tool_calls"]
            return f"run SUCCEEDED after {turns} model turns and {data['tool_calls']} tool calls"
        case "run.failed":
            return f"run FAILED: {data['reason']}"

        case "decision.refused":
            what = f"call {data['tool_call_id']}" if data.get("tool_call_id") else "the run"
            return (
                f"SECURITY: runner refused decision {data['decision_id']} on {what}: {data['reason']} "
                f"(nothing ran on it)"
            )
    return type_name
