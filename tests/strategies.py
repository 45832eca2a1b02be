"""Hypothesis strategies that generate valid Warden payloads and envelope fields."""

from typing import Any, get_args

from hypothesis import strategies as st
from pydantic import JsonValue, StringConstraints

from shared.messages import Name, RunSubmitted, TenantId, Token, ToolCallRequested


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


def json_values() -> st.SearchStrategy[JsonValue]:
    """Any JSON value; NaN and infinities are left out because JSON cannot carry them."""
    scalars: st.SearchStrategy[JsonValue] = (
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=12,
    )


def json_objects() -> st.SearchStrategy[dict[str, JsonValue]]:
    """JSON objects, as tool arguments and run inputs are."""
    return st.dictionaries(st.text(max_size=16), json_values(), max_size=5)


def run_submitted() -> st.SearchStrategy[RunSubmitted]:
    """Valid `run.submitted` payloads across the whole allowed range of every field."""
    return st.builds(
        RunSubmitted,
        agent=names(),
        input=json_objects(),
        priority=st.integers(min_value=0, max_value=9),
        timeout_seconds=st.none() | st.floats(min_value=0, max_value=86_400, exclude_min=True),
        labels=st.dictionaries(st.text(max_size=16), st.text(max_size=32), max_size=4),
    )


def tool_call_requested() -> st.SearchStrategy[ToolCallRequested]:
    """Valid `tool_call.requested` payloads."""
    return st.builds(
        ToolCallRequested,
        tool_call_id=tokens(),
        step=st.integers(min_value=0),
        tool=names(),
        arguments=json_objects(),
    )


def envelope_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for `make_envelope` besides the payload."""
    return st.fixed_dictionaries(
        {
            "tenant": tenants(),
            "subject": tokens(),
            "actor": st.text(min_size=1, max_size=256),
            "source": st.text(min_size=1, max_size=128),
        }
    )
