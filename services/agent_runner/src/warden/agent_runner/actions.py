"""The agent interface the runner drives: what an agent may do next, what it is told of its past, its errors."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import JsonValue

from warden.errors import PermanentError

# --- What an agent can do next ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelTurn:
    """The model thinks or talks: no side effect, only tokens spent.

    A scripted agent plays one from its script (no model is called). A real model's turn, as
    recorded after the runner called it (see `ModelCall`), also holds what the model answered.
    """

    summary: str
    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    cost_usd: float = 0.0
    finish_reason: str | None = None
    # The assistant message as the model returned it: {"content", "tool_calls", "refusal"}.
    message: Mapping[str, JsonValue] | None = None


@dataclass(frozen=True)
class ModelEndpoint:
    """Where a model is served (any OpenAI-compatible Chat Completions API) and how to authenticate.

    The environment is read when the call is made, in the runner: `base_url_env` and `model_env`,
    when set there, override the agent's `base_url` and model (the gate decides on the model so
    chosen); `api_key_env` names the variable holding the key (unset: no key is sent).
    """

    base_url: str
    base_url_env: str | None = None
    model_env: str | None = None
    api_key_env: str | None = None
    timeout_seconds: float = 60.0
    max_retries: int = 3


@dataclass(frozen=True)
class ModelCall:
    """The agent wants its model called with this conversation; the runner asks the policy gate first.

    The runner makes the call (the agent stays a pure function of its history) and records the
    answer as a `ModelTurn`, which the agent reads back on its next step.
    """

    model: str
    endpoint: ModelEndpoint
    messages: list[dict[str, JsonValue]]
    tools: tuple[str, ...]  # the Warden tools offered, by name; the runner adds their schemas
    max_output_tokens: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class ToolCall:
    """The agent wants a tool run; the runner asks the policy gate first and runs it only on allow.

    `invalid` says why the call cannot be made at all (a model's arguments that are not a JSON
    object): nothing is asked or run, and the error goes back to the agent on the record.
    """

    tool: str
    arguments: dict[str, JsonValue]
    invalid: str | None = None


@dataclass(frozen=True)
class Finish:
    """The agent is done; `output` is the run's result."""

    output: JsonValue


@dataclass(frozen=True)
class Fail:
    """The agent gives up; `reason` says why, for the run's failure event."""

    reason: str


Action = ModelTurn | ModelCall | ToolCall | Finish | Fail
Outcome = Literal["ok", "error", "refused"]
OnRefusal = Literal["continue", "fail"]


@dataclass(frozen=True)
class StepRecord:
    """What happened at one step, as the runner recorded it (and rebuilds it from events on resume)."""

    step: int
    action: ModelTurn | ToolCall
    outcome: Outcome | None = None  # None for a model turn: only tool calls have an outcome
    result: JsonValue = None  # the tool's result when the outcome is "ok"
    error: str | None = None  # the tool's error text, or the refusal reason(s)
    host: str | None = None  # for a tool call with a `url` argument: its host
    approved: bool = False  # the tool call ran on a principal's approval


class Agent(Protocol):
    """Anything that, given the run input and the steps so far, says what to do next.

    `next_action` must be a pure function of its arguments: the runner calls it again with a
    history rebuilt from events after a crash and must get the same answer it got before.
    """

    # A read-only property, so frozen dataclasses and plain attributes both satisfy the protocol.
    @property
    def name(self) -> str: ...

    def next_action(self, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]) -> Action: ...


# --- Errors ------------------------------------------------------------------------------------


class AgentDefinitionError(PermanentError):
    """An agent definition (file or constructor arguments) is invalid; the message names the problem."""


class UnknownAgent(PermanentError):
    """No agent of that name is in the catalogue."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown agent {name!r}; known agents: {', '.join(known) or '(none)'}")
        self.name = name
