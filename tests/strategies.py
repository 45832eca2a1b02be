"""Hypothesis strategies that generate valid Warden payloads, envelope fields and agent scripts."""

import json
from typing import Any, get_args

from hypothesis import strategies as st
from pydantic import JsonValue, StringConstraints

from services.agent_runner.agents import ModelTurn, OnRefusal, Outcome, ScriptedAgent, StepRecord, ToolCall
from shared.decoding import MAX_SAFE_INTEGER
from shared.messages import INT32_MAX, Name, RunSubmitted, TenantId, Token, ToolCallRequested


def _matching(annotated: object) -> st.SearchStrategy[str]:
    # Read the pattern off the Annotated type itself, so these strategies follow any change to it.
    for constraint in get_args(annotated)[1:]:
        if isinstance(constraint, StringConstraints) and isinstance(constraint.pattern, str):
            return st.from_regex(constraint.pattern, fullmatch=True)
    raise TypeError(f"{annotated!r} carries no string pattern")


def tokens() -> st.SearchStrategy[str]:
    """Ids that are valid NATS subject tokens."""
    return _matching(Token)


def names() -> st.SearchStrategy[str]:
    """Agent and tool names, namespaces included."""
    return _matching(Name)


def tenants() -> st.SearchStrategy[str]:
    """Tenant ids."""
    return _matching(TenantId)


def texts(max_size: int | None = None) -> st.SearchStrategy[str]:
    """Any text a Warden message may hold: every code point but NUL (Postgres cannot store it) and lone surrogates."""
    return st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=max_size)


def json_values() -> st.SearchStrategy[JsonValue]:
    """Any JSON value Warden accepts: finite numbers, integers every reader holds exactly (shared.decoding)."""
    scalars: st.SearchStrategy[JsonValue] = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
        | st.floats(allow_nan=False, allow_infinity=False)
        | texts()
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(texts(max_size=8), children, max_size=4),
        max_leaves=12,
    )


def json_objects() -> st.SearchStrategy[dict[str, JsonValue]]:
    """JSON objects, as tool arguments and run inputs are."""
    return st.dictionaries(texts(max_size=16), json_values(), max_size=5)


def run_submitted() -> st.SearchStrategy[RunSubmitted]:
    """Valid `run.submitted` payloads across the whole allowed range of every field."""
    return st.builds(
        RunSubmitted,
        agent=names(),
        input=json_objects(),
        priority=st.integers(min_value=0, max_value=9),
        timeout_seconds=st.none() | st.floats(min_value=0, max_value=86_400, exclude_min=True),
        labels=st.dictionaries(texts(max_size=16), texts(max_size=32), max_size=4),
    )


def tool_call_requested() -> st.SearchStrategy[ToolCallRequested]:
    """Valid `tool_call.requested` payloads."""
    return st.builds(
        ToolCallRequested,
        tool_call_id=tokens(),
        step=st.integers(min_value=0, max_value=INT32_MAX),
        agent=names(),
        tool=names(),
        arguments=json_objects(),
    )


def envelope_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for `make_envelope` besides the payload."""
    return st.fixed_dictionaries(
        {
            "tenant": tenants(),
            "subject": tokens(),
            "actor": texts(max_size=256).filter(bool),
            "source": texts(max_size=128).filter(bool),
        }
    )


# --- Agent runner: scripted agents and the histories a runner records for them -------------------

_OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "refused")
_ON_REFUSAL: tuple[OnRefusal, ...] = ("continue", "fail")
_input_keys = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)


def _plain_json() -> st.SearchStrategy[JsonValue]:
    # JSON with no placeholder-like text, which a script would refuse as a malformed placeholder.
    return json_values().filter(lambda value: "{input." not in json.dumps(value))


def _with_placeholders(keys: list[str]) -> st.SearchStrategy[JsonValue]:
    # Plain JSON, a whole-string placeholder, or a placeholder inside text.
    placeholders = st.sampled_from(keys).map(lambda key: "{input." + key + "}")
    embedded = st.tuples(st.text(alphabet="abc /", max_size=4), placeholders).map("".join)
    return _plain_json() | placeholders | embedded


def model_turns() -> st.SearchStrategy[ModelTurn]:
    """Model turns as a script or a history holds them."""
    return st.builds(
        ModelTurn,
        summary=st.text(max_size=16).filter(lambda text: "{input." not in text),
        input_tokens=st.integers(min_value=0, max_value=10_000),
        output_tokens=st.integers(min_value=0, max_value=10_000),
    )


def tool_calls(keys: list[str] | None = None) -> st.SearchStrategy[ToolCall]:
    """Tool calls whose argument values may reference the run input keys `keys`."""
    values = _with_placeholders(keys) if keys else _plain_json()
    return st.builds(ToolCall, tool=names(), arguments=st.dictionaries(st.text(max_size=8), values, max_size=3))


@st.composite
def scripted_runs(draw: st.DrawFn) -> tuple[ScriptedAgent, dict[str, JsonValue], list[StepRecord]]:
    """A scripted agent, a run input holding every key it references, and a history it could have produced."""
    keys = draw(st.lists(_input_keys, min_size=1, max_size=3, unique=True))
    steps = draw(st.lists(model_turns() | tool_calls(keys), min_size=1, max_size=6))
    agent = ScriptedAgent(name=draw(names()), steps=steps, on_refusal=draw(st.sampled_from(_ON_REFUSAL)))
    run_input = draw(st.fixed_dictionaries({key: json_values() for key in keys}))
    history: list[StepRecord] = []
    for position in range(draw(st.integers(min_value=0, max_value=len(steps)))):
        action = steps[position]
        if isinstance(action, ModelTurn):
            history.append(StepRecord(step=position, action=action))
            continue
        outcome = draw(st.sampled_from(_OUTCOMES))
        history.append(
            StepRecord(
                step=position,
                action=action,
                outcome=outcome,
                result=draw(json_values()) if outcome == "ok" else None,
                error=None if outcome == "ok" else draw(st.text(min_size=1, max_size=16)),
            )
        )
    return agent, run_input, history
