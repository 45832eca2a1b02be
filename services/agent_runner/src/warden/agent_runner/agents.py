"""The deterministic scripted agent, and the catalogue of agents loaded from JSON files (scripted or `llm`)."""

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, NonNegativeInt, ValidationError, model_validator

from warden.agent_runner.actions import (
    Action,
    Agent,
    AgentDefinitionError,
    Fail,
    Finish,
    ModelTurn,
    OnRefusal,
    StepRecord,
    ToolCall,
    UnknownAgent,
)
from warden.agent_runner.llm_agent import LlmAgent, LlmAgentDefinition
from warden.messages import Name

# The agents that ship with the runner: package data in an install, a link to the repository's
# `agents/` in a source checkout.
SHIPPED_AGENTS_DIR = Path(__file__).with_name("agents")


# --- Templates: {input.KEY} in a script's strings ----------------------------------------------

# Deliberately tiny: top-level input keys only, no attribute access, no format specs, no eval.
_PLACEHOLDER = re.compile(r"\{input\.([A-Za-z0-9_-]+)\}")
_PLACEHOLDER_START = "{input."


def _strings(value: JsonValue) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def _placeholder_keys(value: JsonValue, where: str) -> set[str]:
    keys: set[str] = set()
    for text in _strings(value):
        found = _PLACEHOLDER.findall(text)
        # A "{input." that the pattern did not take is a typo ("{input.a.b}", "{input.x"): refuse it
        # rather than send the literal text to a tool.
        if text.count(_PLACEHOLDER_START) != len(found):
            raise AgentDefinitionError(
                f"{where}: malformed placeholder in {text!r}; write {{input.KEY}}, KEY made of letters, digits, _ or -"
            )
        keys.update(found)
    return keys


def _as_text(value: JsonValue) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _render(value: JsonValue, run_input: Mapping[str, JsonValue]) -> JsonValue:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:
            # A string that is only a placeholder takes the input value with its JSON type, so
            # {"a": "{input.a}"} passes a number to math.add, not the text of one.
            return copy.deepcopy(run_input[whole.group(1)])
        return _PLACEHOLDER.sub(lambda match: _as_text(run_input[match.group(1)]), value)
    if isinstance(value, list):
        return [_render(item, run_input) for item in value]
    if isinstance(value, dict):
        return {key: _render(item, run_input) for key, item in value.items()}
    return value


# --- The scripted agent ------------------------------------------------------------------------


def _describe(action: ModelTurn | ToolCall) -> str:
    return f"tool call {action.tool}" if isinstance(action, ToolCall) else "model turn"


class ScriptedAgent:
    """An agent that plays a fixed script of model turns and tool calls: deterministic, for demos and tests.

    Strings in a step (a model turn's summary, a tool call's argument values) and in the declared
    output may hold `{input.KEY}` placeholders, filled from the run input when the step is taken.
    A run input that lacks a key the script uses makes `next_action` return `Fail` before the
    first step, so no tool runs for a run that could not finish. After the last step it returns
    `Finish` with the declared output, or, when none is declared, a summary of the tool calls'
    results, refusals and errors. A refused tool call is skipped (`on_refusal="continue"`) or
    fails the run (`on_refusal="fail"`); a tool error never stops the script.
    """

    def __init__(
        self,
        name: str,
        steps: Sequence[ModelTurn | ToolCall],
        on_refusal: OnRefusal = "continue",
        output: JsonValue = None,
        description: str = "",
    ) -> None:
        if on_refusal not in ("continue", "fail"):
            raise AgentDefinitionError(f"agent {name!r}: on_refusal must be 'continue' or 'fail', not {on_refusal!r}")
        self._name = name
        self.steps: tuple[ModelTurn | ToolCall, ...] = tuple(steps)
        self.on_refusal: OnRefusal = on_refusal
        self.output = output
        self.description = description
        keys: set[str] = set()
        for position, step in enumerate(self.steps):
            where = f"agent {name!r}, step {position} ({_describe(step)})"
            template: JsonValue = step.summary if isinstance(step, ModelTurn) else step.arguments
            keys |= _placeholder_keys(template, where)
        keys |= _placeholder_keys(output, f"agent {name!r}, output")
        self.input_keys: frozenset[str] = frozenset(keys)

    @property
    def name(self) -> str:
        """The agent's name, as runs and policies refer to it."""
        return self._name

    def __repr__(self) -> str:
        return f"ScriptedAgent(name={self._name!r}, steps={len(self.steps)}, on_refusal={self.on_refusal!r})"

    def next_action(self, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]) -> Action:
        """The action after `history`: the next scripted step, `Finish` after the last, or `Fail`."""
        missing = sorted(self.input_keys - run_input.keys())
        if missing:
            return Fail(
                reason=f"agent {self._name!r} needs run input key(s) {', '.join(missing)}, which the input lacks"
            )
        diverged = self._divergence(history)
        if diverged:
            return Fail(reason=diverged)
        if history:
            latest = history[-1]
            if latest.outcome == "refused" and self.on_refusal == "fail":
                return Fail(reason=f"step {latest.step}: {_describe(latest.action)} was refused: {latest.error}")
        if len(history) == len(self.steps):
            return Finish(output=self._final_output(run_input, history))
        return self._take(self.steps[len(history)], run_input)

    def _divergence(self, history: Sequence[StepRecord]) -> str | None:
        # A history the script could not have produced means the definition changed under a
        # running (resumed) run; carrying on would pair recorded results with the wrong steps.
        # Only the kind of step and the tool are compared: the recorded arguments and token
        # counts went through events and need not be byte-identical.
        if len(history) > len(self.steps):
            return f"agent {self._name!r} has {len(self.steps)} steps but the run's history has {len(history)}"
        for position, (record, step) in enumerate(zip(history, self.steps, strict=False)):
            recorded, scripted = _describe(record.action), _describe(step)
            if recorded != scripted:
                return (
                    f"agent {self._name!r}: history diverges from the script at step {position}: "
                    f"recorded {recorded}, script has {scripted}"
                )
        return None

    @staticmethod
    def _take(step: ModelTurn | ToolCall, run_input: Mapping[str, JsonValue]) -> ModelTurn | ToolCall:
        if isinstance(step, ModelTurn):
            return ModelTurn(
                summary=_as_text(_render(step.summary, run_input)),
                input_tokens=step.input_tokens,
                output_tokens=step.output_tokens,
            )
        return ToolCall(
            tool=step.tool, arguments={key: _render(value, run_input) for key, value in step.arguments.items()}
        )

    def _final_output(self, run_input: Mapping[str, JsonValue], history: Sequence[StepRecord]) -> JsonValue:
        if self.output is not None:
            return _render(self.output, run_input)
        tool_results: list[JsonValue] = []
        refused: list[JsonValue] = []
        errors: list[JsonValue] = []
        for record in history:
            if not isinstance(record.action, ToolCall):
                continue
            entry: dict[str, JsonValue] = {"step": record.step, "tool": record.action.tool}
            if record.outcome == "ok":
                tool_results.append({**entry, "result": record.result})
            elif record.outcome == "refused":
                refused.append({**entry, "reason": record.error})
            else:
                errors.append({**entry, "error": record.error})
        return {"tool_results": tool_results, "refused": refused, "errors": errors}


# --- Agent definition files ----------------------------------------------------------------------


class _Spec(BaseModel):
    # strict: a definition that says "120" where a number belongs is a mistake, not a number.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _ModelTurnSpec(_Spec):
    summary: str
    input_tokens: NonNegativeInt = 0
    output_tokens: NonNegativeInt = 0


class _ToolCallSpec(_Spec):
    tool: Name
    arguments: dict[str, JsonValue] = Field(default_factory=dict)


_STEP_KINDS = ("model_turn", "tool_call")


class _StepSpec(_Spec):
    model_turn: _ModelTurnSpec | None = None
    tool_call: _ToolCallSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_kind(cls, data: Any) -> Any:
        # Checked before field validation so an unknown kind gets one clear message instead of
        # "field required" for each known kind.
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in _STEP_KINDS:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a step is an object with exactly one key, 'model_turn' or 'tool_call'; got {got}")
        return data

    def to_action(self) -> ModelTurn | ToolCall:
        if self.model_turn is not None:
            turn = self.model_turn
            return ModelTurn(summary=turn.summary, input_tokens=turn.input_tokens, output_tokens=turn.output_tokens)
        assert self.tool_call is not None  # the validator above admits exactly one kind
        return ToolCall(tool=self.tool_call.tool, arguments=dict(self.tool_call.arguments))


class AgentDefinition(_Spec):
    """The JSON file format of a scripted agent."""

    name: Name
    kind: Literal["scripted"] = "scripted"
    description: str = ""
    on_refusal: OnRefusal = "continue"
    steps: list[_StepSpec] = Field(min_length=1)
    output: JsonValue = None  # null: Finish with a summary of the tool calls


def _validation_message(error: ValidationError) -> str:
    problems = []
    for detail in error.errors():
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"]).lstrip(".")
        message = detail["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _reject_constant(constant: str) -> float:
    raise ValueError(f"{constant} is not valid JSON")


def load_agent(path: Path) -> Agent:
    """Read and validate an agent definition (`"kind": "llm"`, else scripted); every problem raises
    `AgentDefinitionError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AgentDefinitionError(f"{path}: cannot read agent definition: {error}") from error
    try:
        # parse_constant: Python's json accepts NaN and Infinity, which no other JSON reader does.
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise AgentDefinitionError(f"{path}: not valid JSON: {error}") from error
    try:
        if isinstance(data, dict) and data.get("kind") == "llm":
            return LlmAgent(LlmAgentDefinition.model_validate(data))
        definition = AgentDefinition.model_validate(data)
    except ValidationError as error:
        raise AgentDefinitionError(f"{path}: invalid agent definition: {_validation_message(error)}") from error
    except AgentDefinitionError as error:
        raise AgentDefinitionError(f"{path}: {error}") from error
    try:
        return ScriptedAgent(
            name=definition.name,
            steps=[step.to_action() for step in definition.steps],
            on_refusal=definition.on_refusal,
            output=definition.output,
            description=definition.description,
        )
    except AgentDefinitionError as error:
        raise AgentDefinitionError(f"{path}: {error}") from error


class AgentCatalogue:
    """The agents a runner can run, by name, loaded from a directory of `*.json` definitions."""

    def __init__(self, agents: Sequence[Agent] = ()) -> None:
        self._agents: dict[str, Agent] = {}
        for agent in agents:
            if agent.name in self._agents:
                raise AgentDefinitionError(f"two agents are named {agent.name!r}")
            self._agents[agent.name] = agent

    @classmethod
    def load(cls, directory: Path) -> "AgentCatalogue":
        """Load every `*.json` file in `directory` (not its subdirectories); any bad file fails the whole load."""
        if not directory.is_dir():
            raise AgentDefinitionError(f"{directory}: agent directory does not exist or is not a directory")
        agents: list[Agent] = []
        origin: dict[str, Path] = {}
        for path in sorted(directory.glob("*.json")):
            agent = load_agent(path)
            if agent.name in origin:
                raise AgentDefinitionError(f"{path}: agent {agent.name!r} is already defined in {origin[agent.name]}")
            origin[agent.name] = path
            agents.append(agent)
        return cls(agents)

    def get(self, name: str) -> Agent:
        """The agent called `name`, or `UnknownAgent`."""
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgent(name, self.names()) from None

    def names(self) -> list[str]:
        """The names of every agent in the catalogue, sorted."""
        return sorted(self._agents)

    def __contains__(self, name: object) -> bool:
        return name in self._agents
