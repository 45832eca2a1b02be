"""A run's history, folded from its own events: the steps already recorded and the decisions on its tool calls.

Pure: no I/O. The executor feeds it the run's events (see `read_history`) when it takes a run up,
so a runner that takes over after a crash continues after the last recorded step.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import JsonValue

from warden.agent_runner.actions import ModelTurn, StepRecord, ToolCall
from warden.messages import (
    MAX_CALL_FACTS,
    ApprovalAnswered,
    CallFact,
    DecisionMade,
    Envelope,
    RunCancelled,
    RunFailed,
    RunStarted,
    RunSucceeded,
    RunUsage,
    StepCompleted,
    ToolCallCompleted,
)


@dataclass
class RunHistory:
    """What the stream says already happened to a run, and the decisions on its tool calls."""

    steps: dict[int, StepRecord] = field(default_factory=dict)
    attempts: int = 0
    finished: bool = False
    # Every decision recorded on each tool call: the runner takes the first that checks out.
    decisions: dict[str, list[DecisionMade]] = field(default_factory=dict)

    def apply(self, envelope: Envelope[Any]) -> None:
        data = envelope.data
        match data:
            case RunStarted():
                self.attempts = max(self.attempts, data.attempt)
            case StepCompleted():
                self.steps[data.step] = StepRecord(
                    step=data.step,
                    action=ModelTurn(
                        summary=data.summary,
                        input_tokens=data.usage.input_tokens,
                        output_tokens=data.usage.output_tokens,
                        model=data.model,
                        cost_usd=data.cost_usd,
                        finish_reason=data.finish_reason,
                        message=data.message,
                    ),
                )
            case ToolCallCompleted():
                # The agent needs the outcome, not the arguments, to go on (see StepRecord).
                self.steps[data.step] = StepRecord(
                    step=data.step,
                    action=ToolCall(tool=data.tool, arguments={}),
                    outcome=data.outcome,
                    result=data.result,
                    error=data.error,
                    host=data.host,
                    approved=self._ran_on_approval(data),
                )
            case DecisionMade(tool_call_id=str() as tool_call_id):
                self.decisions.setdefault(tool_call_id, []).append(data)
            case RunSucceeded() | RunFailed() | RunCancelled():
                self.finished = True

    def _ran_on_approval(self, completed: ToolCallCompleted) -> bool:
        """Whether a call ran under an approval: the decision it names is an answer's allow (recorded before it)."""
        return completed.outcome != "refused" and any(
            decision.decision_id == completed.decision_id
            and decision.request_type == ApprovalAnswered.TYPE
            and decision.effect == "allow"
            for decision in self.decisions.get(completed.tool_call_id, [])
        )

    def ordered_steps(self) -> list[StepRecord]:
        return [self.steps[step] for step in sorted(self.steps)]

    def usage(self) -> RunUsage:
        """What the recorded steps consumed: a runner that takes the run over goes on counting from here,
        so a policy's caps see the whole run, not only this attempt."""
        return usage_of(self.ordered_steps())


def usage_of(steps: Sequence[StepRecord]) -> RunUsage:
    """What these steps of a run consumed (see RunUsage)."""
    turns = [record.action for record in steps if isinstance(record.action, ModelTurn)]
    return RunUsage(
        steps=len(steps),
        tool_calls=sum(isinstance(record.action, ToolCall) for record in steps),
        input_tokens=sum(turn.input_tokens for turn in turns),
        output_tokens=sum(turn.output_tokens for turn in turns),
        # Only a real model's turns were calls (a scripted agent plays its turns).
        model_calls=sum(turn.model is not None for turn in turns),
        cost_usd=round(sum(turn.cost_usd for turn in turns), 9),
    )


def call_facts(steps: Sequence[StepRecord]) -> list[CallFact]:
    """The run's tool calls so far as the policy sees them (see CallFact): what, how it ended, where."""
    return [
        CallFact(tool=record.action.tool, outcome=record.outcome, host=record.host, approved=record.approved)
        for record in steps
        if isinstance(record.action, ToolCall) and record.outcome is not None
    ][-MAX_CALL_FACTS:]


def url_host(arguments: Mapping[str, JsonValue]) -> str | None:
    """The host a tool call's `url` argument names (lower-cased), or None when it has none or no readable one."""
    url = arguments.get("url")
    if not isinstance(url, str):
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host[:256] if host else None
