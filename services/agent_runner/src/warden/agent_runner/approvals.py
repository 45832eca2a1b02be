"""Where a tool call that needed approval stands, from the decisions recorded on it. Pure: no I/O.

The gate answers a call that needs a human with a signed `require_approval` decision (the
request), and each answer to it with a decision on the same call: `allow` (approved by someone
who may), `deny` (rejected, or answered after expiry) or `require_approval` (an answer that does
not count). The runner acts only on the first answer that counted, and only if, at the moment the
call is about to run, that answer has not expired and was given under the policy revision the
call was asked under.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from warden.messages import ApprovalAnswered, DecisionMade


@dataclass(frozen=True)
class Awaiting:
    """The call waits for an answer that counts; `asked` is the gate's require_approval decision."""

    asked: DecisionMade


@dataclass(frozen=True)
class Answered:
    """An answer counted: the call runs on `decision` if it allows, and is refused if it denies."""

    decision: DecisionMade


@dataclass(frozen=True)
class Void:
    """The call may not run: `reason` says why (expired, or approved under another policy), on `decision_id`."""

    reason: str
    decision_id: str


ApprovalState = Awaiting | Answered | Void


def approval_state(signed: Iterable[DecisionMade], now: datetime) -> ApprovalState | None:
    """Where a call stands, from the decisions on it whose signature and arguments hash the runner
    has checked (in stream order); None when it never needed approval."""
    decisions = list(signed)
    asked = next(
        (d for d in decisions if d.request_type != ApprovalAnswered.TYPE and d.effect == "require_approval"), None
    )
    if asked is None or asked.expires_at is None:
        return None
    answer = next(
        (d for d in decisions if d.request_type == ApprovalAnswered.TYPE and d.effect in ("allow", "deny")), None
    )
    if answer is None:
        if asked.expires_at <= now:
            return Void(
                f"no answer that counts came before the approval expired at {asked.expires_at.isoformat()}",
                asked.decision_id,
            )
        return Awaiting(asked)
    if answer.effect == "deny":
        return Answered(answer)
    if answer.policy_revision != asked.policy_revision:
        return Void(
            f"approved under policy {answer.policy_revision}, but the call was asked under {asked.policy_revision}: "
            "the policy changed in between, so the approval does not hold",
            answer.decision_id,
        )
    if answer.expires_at is None or answer.expires_at <= now:
        expiry = answer.expires_at.isoformat() if answer.expires_at else "(none given)"
        return Void(f"the approval expired at {expiry} before the call could run", answer.decision_id)
    return Answered(answer)


def approver_roles(policy_data: Mapping[str, Any], tool: str) -> list[str]:
    """Who may approve a call of `tool`, by role, as the policy data says (what the approval request shows)."""
    tools = policy_data.get("tools")
    own = (
        tools.get(tool, {}).get("approver_roles")
        if isinstance(tools, dict) and isinstance(tools.get(tool), dict)
        else None
    )
    approvals = policy_data.get("approvals")
    default = approvals.get("approver_roles") if isinstance(approvals, dict) else None
    roles = own if isinstance(own, list) else default if isinstance(default, list) else []
    return [role for role in roles if isinstance(role, str)]
