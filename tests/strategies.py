"""Hypothesis strategies that generate valid Warden payloads, envelope fields, agent scripts, and hostile commands."""

import json
from dataclasses import dataclass
from typing import Any, get_args

from hypothesis import strategies as st
from pydantic import JsonValue, StringConstraints

from warden.agent_runner.actions import ModelTurn, OnRefusal, Outcome, StepRecord, ToolCall
from warden.agent_runner.agents import ScriptedAgent
from warden.decoding import MAX_SAFE_INTEGER
from warden.messages import INT32_MAX, Name, RunSubmitted, TenantId, Token, ToolCallRequested, make_envelope


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
    """Any JSON value Warden accepts: finite numbers, integers every reader holds exactly (warden.decoding)."""
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
            "entity_id": tokens(),
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


# --- Hostile input: commands the gate must reject, each in a different way ----------------------


@dataclass(frozen=True)
class HostileCommand:
    """One message an attacker publishes to a command subject, and which rule it breaks."""

    kind: str
    subject: str
    body: bytes
    headers: dict[str, str] | None = None


def _valid_body(tenant: str, run_id: str, input_literal: bytes = b"{}") -> bytes:
    envelope = make_envelope(RunSubmitted(agent="demo"), tenant=tenant, entity_id=run_id, actor="mallory", source="x")
    return envelope.to_bytes().replace(b'"input":{}', b'"input":' + input_literal, 1)


def _nested(depth: int, pair: tuple[bytes, bytes]) -> bytes:
    opener, closer = pair
    return b'{"x":' + opener * depth + b"1" + closer * depth + b"}"


# Run inputs that break a decoding rule, by the rule they break.
_POISON_INPUTS: dict[str, st.SearchStrategy[bytes]] = {
    "deep": st.builds(
        _nested, st.integers(min_value=65, max_value=20_000), st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")])
    ),
    "huge_integer": st.integers(min_value=4_301, max_value=20_000).map(lambda digits: b'{"n":-' + b"9" * digits + b"}"),
    "unsafe_integer": st.integers(min_value=2**53, max_value=10**300).map(lambda value: b'{"n":%d}' % value),
    "overflowing_float": st.integers(min_value=309, max_value=99_999).map(lambda exponent: b'{"f":1e%d}' % exponent),
    "nan": st.sampled_from([b'{"f":NaN}', b'{"f":Infinity}', b'{"f":-Infinity}']),
    "nul": st.just(b'{"s":"a\\u0000b"}'),
    "invalid_utf8": st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]).map(lambda bad: b'{"s":"' + bad + b'"}'),
    "lone_surrogate": st.integers(min_value=0x800, max_value=0xFFF).map(lambda code: b'{"s":"\\ud%03x"}' % code),
    "oversized": st.integers(min_value=65_536, max_value=900_000).map(lambda size: b'{"b":"' + b"x" * size + b'"}'),
}


def _lying_header(subject: str, body: bytes) -> st.SearchStrategy[HostileCommand]:
    # The header names a valid type; the body is an event, or cut short, or no envelope at all.
    return st.builds(
        HostileCommand,
        kind=st.just("lying_header"),
        subject=st.just(subject),
        body=st.sampled_from([b'{"type": "decision.made"}', body[:-2], b"{}"]),
        headers=st.sampled_from(["run.submitted", "tool_call.requested", "decision.made"]).map(
            lambda type_name: {"Warden-Type": type_name}
        ),
    )


@st.composite
def hostile_commands(draw: st.DrawFn, prefix: str, key_scopes: tuple[str, ...] = ("acme", "globex")) -> HostileCommand:
    """A command that breaks one of the rules: a poison body, a lying header, a wrong subject, a squatted key."""
    tenant, run_id = draw(tenants()), draw(tokens())
    subject = f"{prefix}.cmd.{tenant}.run.submitted"
    body = _valid_body(tenant, run_id)
    others = ["not_json", "lying_header", "extra_tokens", "other_tenant", "squatted_key", "bad_tenant_token"]
    kind = draw(st.sampled_from([*_POISON_INPUTS, *others]))
    if kind in _POISON_INPUTS:
        return HostileCommand(kind, subject, _valid_body(tenant, run_id, draw(_POISON_INPUTS[kind])))
    if kind == "not_json":
        garbage = draw(st.binary(max_size=200))
        return HostileCommand(kind, subject, b"\xff" + garbage)
    if kind == "lying_header":
        return draw(_lying_header(subject, body))
    if kind == "extra_tokens":
        return HostileCommand(kind, f"{subject}.{draw(tokens())}", body)
    if kind == "other_tenant":
        other = draw(tenants().filter(lambda candidate: candidate != tenant))
        return HostileCommand(kind, subject, _valid_body(other, run_id))
    if kind == "squatted_key":
        victim = draw(st.sampled_from([scope for scope in key_scopes if scope != tenant] or ["acme"]))
        return HostileCommand(kind, subject, body, {"Nats-Msg-Id": f"{victim}:run.submitted:squat-{draw(tokens())}"})
    # bad_tenant_token: characters NATS allows in a subject and Warden does not in a tenant.
    return HostileCommand(kind, f"{prefix}.cmd.{tenant}@corp.run.submitted", body)


# --- Policy inputs (the gate's input document, policies/README.md), friendly and hostile ---------

# A field that is absent from the input document altogether (not null).
_ABSENT = object()

# Values that are no valid field: wrong types, empties, numbers past what a double holds exactly.
_ODD_VALUES: list[JsonValue] = [None, "", 0, -1, 2**53 + 1, 2**64, 1.5, True, [], {}, "İ", "\u0130nfo"]
_HUGE_NUMBERS = [2**53 - 1, 2**53, 2**53 + 1, 2**63, 2**64 + 3, 10**30, -(2**63), 1e300, 1e-7, 0.1]


def _counters() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=0, max_value=2),
        st.integers(min_value=0, max_value=25),
        st.sampled_from([*_HUGE_NUMBERS, _ABSENT, None, "3", -5, 2.5]),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def _urls() -> st.SearchStrategy[Any]:
    hosts = ["example.com", "www.example.com", "docs.python.org", "EXAMPLE.com.", "example.com:8443",
             "example.com.evil.net", "notexample.com", "example.com@evil.com", "evİl.example.com",
             "\u0130nfo.example.com", "docs.pyth\u0130n.org", "exampl\u00e9.com", "ex\u212aample.com",
             "xn--exmple-cua.com", "", "example.com\\@evil.com", "ex%61mple.com"]  # fmt: skip
    schemes = ["https://", "http://", "HTTPS://", "ftp://", "", "httpſ://"]
    built = st.builds(lambda scheme, host, path: scheme + host + path, st.sampled_from(schemes), st.sampled_from(hosts),
                      st.sampled_from(["", "/", "/x?y=1#z", "/\u0130"]))  # fmt: skip
    return built | st.sampled_from([7, None, ["https://example.com"]]) | texts(max_size=20)


def _arguments() -> st.SearchStrategy[Any]:
    secret = st.sampled_from(["hmac-sha256:" + "ab" * 32, "hmac-sha256:" + "AB" * 32, "Bearer s3cr3t", 42, None])
    named = st.fixed_dictionaries({}, optional={"url": _urls(), "authorization": secret, "a": _counters()})
    return named | st.sampled_from([None, [], "url", _ABSENT])


def _history() -> st.SearchStrategy[Any]:
    call = st.fixed_dictionaries(
        {},
        optional={
            "tool": st.sampled_from(["web.fetch", "web.fetch", "http.post", "math.add", 3]),
            "outcome": st.sampled_from(["ok", "ok", "error", "denied", None, 1]),
            "host": st.sampled_from(["example.com", None]),
            "approved": st.booleans() | st.none(),
        },
    )
    return st.fixed_dictionaries(
        {}, optional={"tool_calls": st.lists(call, max_size=3) | st.sampled_from([None, {}, "x"])}
    )


def _drop_absent(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_absent(v) for k, v in value.items() if v is not _ABSENT}
    if isinstance(value, list):
        return [_drop_absent(v) for v in value if v is not _ABSENT]
    return value


POLICY_ACTIONS = ["run.start", "tool.call", "model.call", "approval.answer", "run.cancel", "halt", "halt.lift"]
_POLICY_TOOLS = ["math.add", "text.echo", "web.fetch", "http.post", "clock.sleep", "payments.refund",
                 "time.get_current_time", "nosuch.tool"]  # fmt: skip
# Tools each agent of the starter data may call, the ones with rules of their own first.
_AGENT_TOOLS = {
    "demo": ["web.fetch", "math.add"],
    "researcher": ["web.fetch"],
    "reporter": ["web.fetch", "http.post"],
    "refunds": ["payments.refund", "text.echo"],
    "assistant": ["http.post", "time.get_current_time"],
}
_PINNED_DIGEST = "sha256:f5f61883b7c0671fdf991226a36f6cf3a1a67087e64f736cb4aba06f860e5de6"


def _odd() -> st.SearchStrategy[Any]:
    return st.sampled_from([*_ODD_VALUES, *_HUGE_NUMBERS, _ABSENT]) | texts(max_size=8)


@st.composite
def policy_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """An input document for `data.warden.authz.decision` (policies/README.md), for every action.

    A well-formed request over the starter data's names, then up to three of its fields made hostile:
    missing, mistyped, empty, non-ASCII, or numbers past what a double holds exactly.
    """
    action = draw(st.sampled_from(POLICY_ACTIONS) | st.just("tool.call"))  # tool calls have the most rules
    principals = [("acme", "alice"), ("acme", "bob"), ("acme", "carol"), ("acme", "dana"), ("globex", "gina"),
                  ("globex", "hank"), ("acme", "mallory")]  # fmt: skip
    tenant, principal = draw(st.sampled_from(principals))
    agents = ["demo", "researcher", "reporter", "slow", "refunds", "assistant", "nosuch"]
    agent = draw(st.sampled_from(agents))
    if draw(st.booleans()):  # half the time, a principal who may run the agent and a tool it may call
        tenant, principal = ("acme", "carol") if agent == "refunds" else ("acme", "alice")
    own_tools = _AGENT_TOOLS.get(agent, _POLICY_TOOLS)
    tool = {"name": draw(st.sampled_from(own_tools) | st.sampled_from(_POLICY_TOOLS)), "arguments": draw(_arguments())}
    if draw(st.integers(0, 3)) == 0:
        tool["digest"] = draw(st.sampled_from([_PINNED_DIGEST, "sha256:00"]))
    usage = {k: draw(_counters()) for k in ("steps", "tool_calls", "input_tokens", "output_tokens")}
    usage["cost_usd"] = draw(st.sampled_from([0, 0.01, 0.049, 0.05, 0.5, 1.0, 2]) | _counters())
    document: dict[str, Any] = {
        "action": action,
        "tenant": tenant,
        "principal": principal,
        "agent": agent,
        "tool": tool if action in {"tool.call", "approval.answer"} else None,
        "model": None,
        "run": {"id": draw(st.sampled_from(["R1", "run-\u0130"])), "usage": usage, "history": draw(_history())},
    }
    if action == "model.call":
        document["model"] = {"name": draw(st.sampled_from(["warden-test-model", "gpt-4o-mini", "llama3.2", "gpt-5"])),
                             "max_output_tokens": draw(_counters())}  # fmt: skip
    if action == "approval.answer":
        document["approval"] = {"id": "A1", "requested_by": draw(st.sampled_from(["alice", "carol", "dana"])),
                                "approve": draw(st.booleans()), "reason": draw(texts(max_size=8))}  # fmt: skip
    if action in {"run.cancel", "halt", "halt.lift"}:
        scope = draw(st.sampled_from(["tenant", "agent"]))
        document["control"] = {"reason": draw(texts(max_size=8)), "scope": scope}
        document["agent"] = document["agent"] if scope == "agent" else None
        document["run"] = {"id": "R1"} if action == "run.cancel" else None
    paths = [("action",), ("tenant",), ("principal",), ("agent",), ("tool",), ("tool", "name"), ("tool", "arguments"),
             ("tool", "digest"), ("run",), ("run", "id"), ("run", "usage"), ("run", "usage", "tool_calls"),
             ("run", "usage", "input_tokens"), ("run", "usage", "cost_usd"), ("run", "history"), ("model",),
             ("model", "name"), ("approval",), ("approval", "requested_by"), ("control",),
             ("control", "scope")]  # fmt: skip
    for path in draw(st.lists(st.sampled_from(paths), max_size=3)):
        parent = document
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None  # type: ignore[assignment]
        if isinstance(parent, dict):
            parent[path[-1]] = draw(_odd() | st.sampled_from(POLICY_ACTIONS) | st.sampled_from(agents))
    return _drop_absent(document)  # type: ignore[no-any-return]
