"""The `llm` agent kind: a model behind any OpenAI-compatible Chat Completions endpoint, calling tools.

The agent is a pure function of its run's history, like every agent: it builds the conversation
from the recorded steps (the model's answers are recorded, never asked for again) and says what
comes next. The runner makes each model call and each tool call, after the policy gate allows it.

A model turn that asks for several tool calls becomes that many steps, one per call, each gated
on its own; when every one of them has its result, the model is called again with the results.
"""

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from warden.agent_runner.actions import (
    Action,
    AgentDefinitionError,
    Fail,
    Finish,
    ModelCall,
    ModelEndpoint,
    ModelTurn,
    StepRecord,
    ToolCall,
)
from warden.messages import Name

# What the Chat Completions API accepts as a function name: Warden's tool names ("web.fetch",
# "time.get_current_time") have dots, which it refuses, so they are spelt with "__" there.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NOT_IN_A_TOOL_NAME = re.compile(r"[^A-Za-z0-9_.:-]")


def function_name(tool: str) -> str:
    """How a Warden tool is named to the model."""
    return tool.replace(".", "__").replace(":", "--")


def tool_name(function: str) -> str:
    """The Warden tool a model's function name stands for, also for names never offered (a model
    may call anything it read somewhere): those go to the gate as named, and it refuses them."""
    name = _NOT_IN_A_TOOL_NAME.sub("_", function.replace("__", ".").replace("--", ":"))[:128]
    return name if name and name[0].isalnum() else f"x{name}"[:128]


class _Spec(BaseModel):
    # strict: a definition that says "120" where a number belongs is a mistake, not a number.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class EndpointSpec(_Spec):
    """Where the model is served, and how to authenticate: read from the runner's environment at each call."""

    base_url: str = Field(min_length=1, description="An OpenAI-compatible API root, e.g. http://localhost:11434/v1")
    base_url_env: str | None = Field(default=None, description="A variable that, when set, overrides base_url.")
    model_env: str | None = Field(default=None, description="A variable that, when set, overrides the model.")
    api_key_env: str | None = Field(default=None, description="The variable holding the API key; unset: no key.")
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries of 408/409/429/5xx and lost connections.")


class LlmAgentDefinition(_Spec):
    """The JSON file format of an `llm` agent."""

    name: Name
    kind: Literal["llm"]
    description: str = ""
    model: str = Field(min_length=1, max_length=256)
    endpoint: EndpointSpec
    system_prompt: str = ""
    tools: list[Name] = Field(default_factory=list)
    max_steps: int = Field(default=10, ge=1, le=50, description="Model calls a run may make.")
    max_output_tokens: int | None = Field(default=1024, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)


@dataclass(frozen=True)
class LlmAgent:
    """An agent whose every move is a model's answer; see the module's docstring."""

    definition: LlmAgentDefinition

    def __post_init__(self) -> None:
        names: dict[str, str] = {}
        for tool in self.definition.tools:
            function = function_name(tool)
            if not _FUNCTION_NAME.match(function):
                raise AgentDefinitionError(
                    f"agent {self.name!r}: tool {tool!r} cannot be offered to a model: its name as a function, "
                    f"{function!r}, must be 1 to 64 letters, digits, _ or -"
                )
            if function in names:
                raise AgentDefinitionError(
                    f"agent {self.name!r}: tools {names[function]!r} and {tool!r} have the same function name"
                )
            names[function] = tool

    @property
    def name(self) -> str:
        """The agent's name, as runs and policies refer to it."""
        return self.definition.name

    def pending_tool_calls(self, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]) -> list[ToolCall]:
        """The tool calls of the model's last turn the run has not made yet, in order.

        The model asked for them together, before it saw any of their results, so none depends
        on another's: the runner may ask the gate about all of them at once (and several may
        await approval at once).
        """
        return Conversation.of(self.definition, run_input, history).pending

    def next_action(self, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]) -> Action:
        """A tool call the model asked for and the run has not made yet; else the model's final answer
        (`Finish`) or failure; else the next model call, with the whole conversation."""
        conversation = Conversation.of(self.definition, run_input, history)
        if conversation.pending:
            return conversation.pending[0]
        last = history[-1].action if history else None
        if isinstance(last, ModelTurn):
            message = last.message or {}
            if message.get("refusal"):
                return Fail(reason=f"the model refused: {message['refusal']}")
            if last.finish_reason == "length":
                cap = self.definition.max_output_tokens
                return Fail(reason=f"the model's answer was cut off at its output cap ({cap} tokens)")
            return Finish(output={"answer": message.get("content"), "model": last.model})
        if conversation.model_turns >= self.definition.max_steps:
            return Fail(reason=f"the agent made {conversation.model_turns} model calls (max_steps) without finishing")
        endpoint = self.definition.endpoint
        return ModelCall(
            model=self.definition.model,
            endpoint=ModelEndpoint(**endpoint.model_dump()),
            messages=conversation.messages,
            tools=tuple(self.definition.tools),
            max_output_tokens=self.definition.max_output_tokens,
            temperature=self.definition.temperature,
        )


def user_prompt(run_input: Mapping[str, JsonValue]) -> str:
    """The first user message: the run input's `prompt` when it is a string, else the input as JSON."""
    prompt = run_input.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(run_input, sort_keys=True)


def _tool_message(record: StepRecord) -> str:
    if record.outcome == "ok":
        return record.result if isinstance(record.result, str) else json.dumps(record.result, sort_keys=True)
    if record.outcome == "refused":
        return f"Refused by Warden's policy; the tool did not run: {record.error}"
    return f"The tool failed: {record.error}"


def _tool_calls(message: Mapping[str, JsonValue]) -> list[Mapping[str, JsonValue]]:
    calls = message.get("tool_calls")
    return [call for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []


def _requested(call: Mapping[str, JsonValue]) -> ToolCall:
    """The Warden tool call a model's tool call stands for (`invalid` when its arguments are unusable)."""
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    name = tool_name(str(function.get("name") or ""))
    text = function.get("arguments")
    try:
        arguments = json.loads(text) if isinstance(text, str) and text.strip() else {}
    except ValueError as error:
        return ToolCall(tool=name, arguments={}, invalid=f"the model's arguments are not JSON: {error}")
    if not isinstance(arguments, dict):
        return ToolCall(tool=name, arguments={}, invalid="the model's arguments are not a JSON object")
    return ToolCall(tool=name, arguments=arguments)


@dataclass
class Conversation:
    """The messages the model is sent, rebuilt from a run's steps, and the tool calls still to make."""

    messages: list[dict[str, JsonValue]]
    pending: list[ToolCall]
    model_turns: int

    @classmethod
    def of(
        cls, definition: LlmAgentDefinition, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]
    ) -> "Conversation":
        messages: list[dict[str, JsonValue]] = []
        if definition.system_prompt:
            messages.append({"role": "system", "content": definition.system_prompt})
        messages.append({"role": "user", "content": user_prompt(run_input)})
        asked: list[Mapping[str, JsonValue]] = []  # the last turn's tool calls not yet answered
        model_turns = 0
        for record in history:
            if isinstance(record.action, ModelTurn):
                model_turns += 1
                message = record.action.message or {"content": record.action.summary}
                asked = _tool_calls(message)
                assistant: dict[str, JsonValue] = {"role": "assistant", "content": message.get("content")}
                if asked:
                    assistant["tool_calls"] = [dict(call) for call in asked]
                messages.append(assistant)
            elif asked:
                answered = asked.pop(0)
                messages.append({"role": "tool", "tool_call_id": answered.get("id"), "content": _tool_message(record)})
        return cls(messages=messages, pending=[_requested(call) for call in asked], model_turns=model_turns)
