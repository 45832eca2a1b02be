"""The message contract holds: generated artefacts match the code, and schemas, parser and envelope agree."""

import functools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from schemas.generate import (
    README_END,
    README_START,
    REGENERATE_COMMAND,
    SERVICE_CHANNELS,
    asyncapi_document,
    check_artefacts,
    json_schemas,
    subject_table_markdown,
    write_artefacts,
)
from tests.strategies import envelope_fields, run_submitted, tool_call_requested
from warden.audit_projector.advisories import ADVISORIES_TITLE
from warden.errors import InvalidMessage, RejectionCode
from warden.messages import (
    ENVELOPE_TYPES,
    MESSAGE_TYPES,
    UPCASTERS,
    ApprovalAnswered,
    ApprovalRequested,
    AwaitedApproval,
    CommandRejected,
    DecisionMade,
    DecisionRefused,
    DecisionShadowed,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    MessageDeadLettered,
    ModelCallRequested,
    Payload,
    PolicyActivated,
    PolicyChanged,
    PolicyChangeRequested,
    RunCancelled,
    RunCancelRequested,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunQueued,
    RunResumed,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    RunUsage,
    StepCompleted,
    StreamGapDetected,
    TokenUsage,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.subjects import CHANNELS

ROOT = Path(__file__).resolve().parents[1]

APPROVAL_EXPIRY = datetime(2026, 12, 2, 12, 30, tzinfo=UTC)
EXAMPLES: dict[str, Payload] = {
    "run.submitted": RunSubmitted(agent="researcher", input={"question": "why?", "depth": [1, 2.5, None]}),
    "tool_call.requested": ToolCallRequested(
        tool_call_id="tc-1", step=2, agent="researcher", tool="web.fetch", arguments={"url": "https://example.com"}
    ),
    "model_call.requested": ModelCallRequested(
        call_id="mc-1",
        step=0,
        agent="assistant",
        model="gpt-4o-mini",
        max_output_tokens=512,
        usage=RunUsage(steps=2, model_calls=1, input_tokens=120, output_tokens=30, cost_usd=0.000036),
    ),
    "command.rejected": CommandRejected(
        code=RejectionCode.UNKNOWN_TYPE.value,
        reason="unknown message type 'run.exploded'",
        command_subject="warden.cmd.acme.run.exploded",
        command_stream_seq=17,
        command_type="run.exploded",
        size_bytes=312,
    ),
    "decision.made": DecisionMade(
        decision_id="d-1",
        request_type="run.submitted",
        request_id="01890a5d-ac96-774b-bcce-b302099a8057",
        request_seq=3,
        effect="require_approval",
        reasons=["agent researcher needs approval after hours"],
        policy_revision="rev-7",
        evaluation_ms=0.42,
        input={"action": "run.start", "tenant": "acme", "principal": "alice", "agent": "researcher"},
        input_hash="sha256:" + "0" * 64,
    ),
    "run.queued": RunQueued(decision_id="d-1", priority=3, agent="demo", request_seq=1),
    "run.dispatched": RunDispatched(
        decision_id="d-1",
        agent="demo",
        request_seq=3,
        decision=DecisionMade(
            decision_id="d-1",
            request_type="run.submitted",
            request_id="01890a5d-ac96-774b-bcce-b302099a8057",
            request_seq=3,
            effect="allow",
            policy_revision="rev-7",
            evaluation_ms=0.3,
            signing_key="MCowBQYDK2VwAyEA3o8cS0zI4tGHlmXVNzm2ZIFKhKBwhmOD3u7vXOh3Fyw=",
            signature="c2lnbmF0dXJl",
        ),
    ),
    "run.started": RunStarted(decision_id="d-1", worker="runner-a", attempt=2),
    "step.completed": StepCompleted(
        step=1, kind="model_turn", summary="planned", usage=TokenUsage(input_tokens=120, output_tokens=40)
    ),
    "tool_call.completed": ToolCallCompleted(
        tool_call_id="tc-1", step=2, tool="web.fetch", decision_id="d-2", outcome="ok", result={"status": 200}
    ),
    "run.succeeded": RunSucceeded(output={"answer": 42}, steps=3, tool_calls=1),
    "run.failed": RunFailed(reason="the tool web.fetch was refused", error_type="PolicyDenied", steps=2),
    "stream.gap_detected": StreamGapDetected(stream="WARDEN_EVENTS", first_seq=120, last_seq=133),
    "decision.refused": DecisionRefused(
        decision_id="d-forged", tool_call_id="tc-1", reason="bad signature (forged or altered)", decision_seq=41
    ),
    "approval.answered": ApprovalAnswered(approval_id="d-2", approval_seq=44, approve=False, reason="not this one"),
    "approval.requested": ApprovalRequested(
        approval_id="d-2",
        tool_call_id="tc-1",
        step=2,
        agent="refunds",
        tool="payments.refund",
        arguments={"order": "A-1", "amount": 5},
        arguments_hash="sha256:00",
        policy_revision="rev-7",
        requested_by="carol",
        approver_roles=["approver"],
        expires_at=APPROVAL_EXPIRY,
        reasons=["tool payments.refund requires human approval"],
        decision=DecisionMade(
            decision_id="d-2",
            request_type="tool_call.requested",
            request_id="01890a5d-ac96-774b-bcce-b302099a8058",
            request_seq=9,
            effect="require_approval",
            policy_revision="rev-7",
            evaluation_ms=0.2,
            tool_call_id="tc-1",
            arguments_hash="sha256:00",
            expires_at=APPROVAL_EXPIRY,
        ),
    ),
    "run.paused": RunPaused(
        reason="1 tool call(s) await approval",
        awaiting=[AwaitedApproval(approval_id="d-2", tool_call_id="tc-1", expires_at=APPROVAL_EXPIRY)],
    ),
    "run.resumed": RunResumed(
        reason="every tool call it awaited has an answer",
        resume=1,
        decision_id="d-1",
        priority=5,
        agent="refunds",
        request_seq=3,
    ),
    "message.dead_lettered": MessageDeadLettered(
        stream="WARDEN_WORK",
        stream_seq=9,
        consumer="agent_runner",
        reason="terminated by the consumer: invalid work item: unknown message type 'run.exploded'",
        deliveries=1,
        given_up_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        message_subject="warden.work.acme",
        raw="eyJ0eXBlIjogInJ1bi5leHBsb2RlZCJ9",
    ),
    "run.cancel_requested": RunCancelRequested(reason="wrong input"),
    "halt.requested": HaltRequested(agent="slow", reason="incident 42"),
    "halt.lift_requested": HaltLiftRequested(agent=None, reason="incident over"),
    "run.cancelled": RunCancelled(reason="cancelled by alice: wrong input", decision_id="d-9", control="cancel"),
    "policy.activated": PolicyActivated(
        revision="sha256:0123456789abcdef",
        files={"authz.rego": "package warden.authz\n", "data.json": "{}"},
        cause="start",
        activated_by="policy-gate",
        origin="/etc/warden/policies",
    ),
    "policy.change_requested": PolicyChangeRequested(
        change="shadow",
        files={"authz.rego": "package warden.authz\n", "data.json": "{}"},
        revision="sha256:0123456789abcdef",
        reason="narrow web.fetch",
    ),
    "policy.changed": PolicyChanged(
        change="promote",
        revision="sha256:0123456789abcdef",
        previous_revision="sha256:fedcba9876543210",
        changed_by="operator",
        decision_id="d-10",
        request_seq=12,
    ),
    "decision.shadowed": DecisionShadowed(
        decision_id="d-11",
        request_type="tool_call.requested",
        request_seq=13,
        entity_id="run-1",
        active_revision="sha256:fedcba9876543210",
        active_effect="allow",
        active_reasons=["tool web.fetch is allowed for agent researcher"],
        candidate_revision="sha256:0123456789abcdef",
        candidate_effect="deny",
        candidate_reasons=["host example.com is not in web.fetch's allowed domains [docs.python.org]"],
    ),
}


def envelope_of(payload: Payload, caused_by: Envelope[Any] | None = None, source: str = "tests") -> Envelope[Any]:
    """Wrap an example payload for one fixed tenant, run and actor."""
    return make_envelope(
        payload, tenant="acme", entity_id="run-1", actor="user:alice", source=source, caused_by=caused_by
    )


@functools.cache
def validator(type_name: str) -> Draft202012Validator:
    """A JSON Schema validator for one type, built once per test session."""
    schema = json_schemas()[type_name]
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def example_document(type_name: str) -> dict[str, Any]:
    """The wire form of the example envelope of `type_name`, as a JSON object."""
    document: dict[str, Any] = json.loads(envelope_of(EXAMPLES[type_name]).to_bytes())
    return document


def schema_errors(type_name: str, document: object) -> list[str]:
    """Every reason the schema of `type_name` rejects `document`."""
    return [error.message for error in validator(type_name).iter_errors(document)]


# --- (a) generated files are checked in and current -------------------------------------------


def test_checked_in_artefacts_match_the_registry() -> None:
    """schemas/ holds exactly what schemas/generate.py generates from the registry and catalogue."""
    problems = check_artefacts(ROOT)
    assert not problems, "contract artefacts are out of date; run `{}`:\n{}".format(
        REGENERATE_COMMAND, "\n".join(problems)
    )


def test_drift_check_reports_missing_stale_and_extra_files(tmp_path: Path) -> None:
    """check_artefacts names a missing, an edited and an unexpected file, and write_artefacts repairs all three."""
    assert check_artefacts(tmp_path) != []
    write_artefacts(tmp_path)
    assert check_artefacts(tmp_path) == []
    schemas = tmp_path / "schemas"
    (schemas / "run.failed.schema.json").unlink()
    (schemas / "asyncapi.json").write_text("{}\n")
    (schemas / "run.exploded.schema.json").write_text("{}\n")
    (schemas / "notes.md").write_text("not ours\n")

    problems = check_artefacts(tmp_path)

    assert len(problems) == 3, problems
    assert any(p.startswith("schemas/run.failed.schema.json is missing") for p in problems)
    assert any(p.startswith("schemas/asyncapi.json is stale") for p in problems)
    assert any(p.startswith("schemas/run.exploded.schema.json is extra") for p in problems)
    changed = write_artefacts(tmp_path)
    assert sorted(p.name for p in changed) == ["asyncapi.json", "run.exploded.schema.json", "run.failed.schema.json"]
    assert check_artefacts(tmp_path) == []
    assert (schemas / "notes.md").exists()


def test_writing_twice_changes_nothing(tmp_path: Path) -> None:
    """Generation is deterministic: a second write finds every file already current."""
    first = write_artefacts(tmp_path)
    assert len(first) == len(MESSAGE_TYPES) + 1
    assert write_artefacts(tmp_path) == []


# --- (b) the README table ----------------------------------------------------------------------


def test_readme_subject_table_matches_the_catalogue() -> None:
    """README.md carries, between its subject markers, exactly the table generated from CHANNELS."""
    readme = ROOT / "README.md"
    hint = f"print the table with `{REGENERATE_COMMAND} --table` and paste it between {README_START} and {README_END}"
    assert readme.is_file(), f"README.md is missing; {hint}"
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    assert start != -1, f"README.md has no {README_START} marker; {hint}"
    assert end != -1, f"README.md has no {README_END} marker; {hint}"
    assert start < end, f"README.md has {README_END} before {README_START}; {hint}"
    table = text[start + len(README_START) : end].strip()
    assert table == subject_table_markdown().strip(), f"README.md's subject table is stale; {hint}"


def test_subject_table_has_one_row_per_channel_under_the_default_prefix() -> None:
    """The generated table lists every channel, with `{prefix}` shown as `warden`."""
    table = subject_table_markdown()
    rows = table.strip().splitlines()[2:]
    assert len(rows) == len(CHANNELS)
    assert "{prefix}" not in table
    for channel, row in zip(CHANNELS, rows, strict=True):
        assert row.startswith(f"| `{channel.pattern.replace('{prefix}', 'warden')}` |")
        assert row.count(" | ") == 4
        for type_name in channel.message_types:
            assert f"`{type_name}`" in row


# --- (c) every type: schema-valid and round-trips ---------------------------------------------


def test_examples_cover_every_registered_type() -> None:
    """Each registered message type has an example here, so a new type cannot skip these checks."""
    assert set(EXAMPLES) == set(MESSAGE_TYPES)
    for type_name, payload in EXAMPLES.items():
        assert type_name == payload.TYPE


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_made_envelope_validates_against_its_schema(type_name: str) -> None:
    """An envelope make_envelope built is accepted by the generated JSON Schema of its type."""
    assert schema_errors(type_name, example_document(type_name)) == []


@pytest.mark.parametrize("type_name", sorted(EXAMPLES))
def test_envelope_round_trips_through_bytes(type_name: str) -> None:
    """to_bytes then parse_envelope gives back an equal envelope of the same concrete class."""
    envelope = envelope_of(EXAMPLES[type_name])
    parsed = parse_envelope(envelope.to_bytes())
    assert parsed == envelope
    assert type(parsed) is ENVELOPE_TYPES[type_name]


def test_caused_envelope_carries_correlation_and_validates() -> None:
    """A follow-up message keeps its cause's correlation id and still satisfies its schema."""
    cause = envelope_of(EXAMPLES["run.submitted"])
    effect = envelope_of(EXAMPLES["run.queued"], caused_by=cause, source="scheduler")
    assert (effect.correlation_id, effect.causation_id) == (cause.id, cause.id)
    assert schema_errors("run.queued", json.loads(effect.to_bytes())) == []
    assert parse_envelope(effect.to_bytes()) == effect


# --- (d) a schema accepts only its own type ----------------------------------------------------


@pytest.mark.parametrize("schema_type", sorted(MESSAGE_TYPES))
def test_schema_rejects_every_other_type(schema_type: str) -> None:
    """The schema of one type rejects a valid document of any other type."""
    for other in sorted(set(MESSAGE_TYPES) - {schema_type}):
        assert schema_errors(schema_type, example_document(other)), f"{schema_type} accepted a {other}"


def test_schema_rejects_a_document_that_differs_only_in_type() -> None:
    """Relabelling a valid document's `type` is enough for its former schema to reject it."""
    document = {**example_document("run.succeeded"), "type": "run.failed"}
    error = best_match(validator("run.succeeded").iter_errors(document))
    assert error is not None
    assert list(error.path) == ["type"]


# --- (e) the parser refuses bad input with the right code ---------------------------------------


def _valid_bytes() -> bytes:
    return envelope_of(EXAMPLES["run.submitted"]).to_bytes()


# Built once: two envelopes can differ in length (a timestamp with no microseconds is shorter).
VALID = _valid_bytes()


def _edited(edit: Callable[[dict[str, Any]], object]) -> bytes:
    document = json.loads(_valid_bytes())
    edit(document)
    return json.dumps(document).encode()


def _with_input(literal: bytes) -> bytes:
    """The valid envelope with its run input's value spelt as raw JSON text (which json.dumps could not write)."""
    return VALID.replace(b'"input":{', b'"input":{"hostile":' + literal + b",", 1)


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


EXAMPLES_STEP = {**json.loads(EXAMPLES["tool_call.requested"].model_dump_json()), "step": 2**31}
USAGE = {"steps": 1, "tool_calls": 2**53}


@pytest.mark.parametrize(
    ("raw", "max_bytes", "code", "reason_pattern"),
    [
        pytest.param(b"\xff\xfe{not json", None, RejectionCode.NOT_JSON, "not JSON", id="non-json-bytes"),
        pytest.param(b"{'type': 1}", None, RejectionCode.NOT_JSON, "not JSON", id="almost-json"),
        pytest.param(b"[1, 2]", None, RejectionCode.SCHEMA_INVALID, "JSON object", id="json-array"),
        pytest.param(
            _edited(lambda d: d.update(type="run.exploded")),
            None,
            RejectionCode.UNKNOWN_TYPE,
            "run.exploded",
            id="unknown-type",
        ),
        pytest.param(_edited(lambda d: d.pop("type")), None, RejectionCode.SCHEMA_INVALID, "'type'", id="missing-type"),
        pytest.param(
            _edited(lambda d: d.pop("actor")), None, RejectionCode.SCHEMA_INVALID, "actor", id="missing-field"
        ),
        pytest.param(
            _edited(lambda d: d["data"].pop("agent")),
            None,
            RejectionCode.SCHEMA_INVALID,
            "data.agent",
            id="missing-payload-field",
        ),
        pytest.param(
            _edited(lambda d: d.update(colour="red")),
            None,
            RejectionCode.SCHEMA_INVALID,
            "colour",
            id="extra-envelope-field",
        ),
        pytest.param(
            _edited(lambda d: d["data"].update(agnet="typo")),
            None,
            RejectionCode.SCHEMA_INVALID,
            "data.agnet",
            id="extra-payload-field",
        ),
        pytest.param(VALID, len(VALID) - 1, RejectionCode.TOO_LARGE, "limit", id="oversize"),
        pytest.param(_with_input(_nested(70)), None, RejectionCode.TOO_DEEP, "nested", id="nested-70"),
        pytest.param(_nested(10_000), None, RejectionCode.TOO_DEEP, "nested", id="nested-10000"),
        pytest.param(_with_input(b"[" * 3000 + b"]" * 3000), None, RejectionCode.TOO_DEEP, "nested", id="arrays"),
        pytest.param(_with_input(b"9" * 5000), None, RejectionCode.NUMBER_OUT_OF_RANGE, "range", id="5000-digits"),
        pytest.param(_with_input(b"9007199254740992"), None, RejectionCode.NUMBER_OUT_OF_RANGE, "2**53", id="2**53"),
        pytest.param(_with_input(b"-9007199254740992"), None, RejectionCode.NUMBER_OUT_OF_RANGE, "2**53", id="-2**53"),
        pytest.param(_with_input(b"1e999"), None, RejectionCode.NUMBER_OUT_OF_RANGE, "finite", id="overflow"),
        pytest.param(_with_input(b"NaN"), None, RejectionCode.NUMBER_OUT_OF_RANGE, "finite", id="nan"),
        pytest.param(_with_input(b"-Infinity"), None, RejectionCode.NUMBER_OUT_OF_RANGE, "finite", id="infinity"),
        pytest.param(
            _edited(lambda d: d.update(type="tool_call.requested", data={**EXAMPLES_STEP, "step": 1, "usage": USAGE})),
            None,
            RejectionCode.SCHEMA_INVALID,
            "data.usage.tool_calls",
            id="count-past-2**53",
        ),
        pytest.param(_with_input(b'"a\\u0000b"'), None, RejectionCode.INVALID_STRING, "U+0000", id="nul"),
        pytest.param(_with_input(b'"\\ud800"'), None, RejectionCode.NOT_JSON, "hex escape", id="lone-surrogate"),
        pytest.param(_with_input(b'"\xff"'), None, RejectionCode.NOT_JSON, "JSON", id="invalid-utf8"),
        pytest.param(
            _edited(lambda d: d.update(type="tool_call.requested", data=dict(EXAMPLES_STEP))),
            None,
            RejectionCode.SCHEMA_INVALID,
            "data.step",
            id="step-past-int32",
        ),
        pytest.param(
            _edited(lambda d: d.update(schema_version=RunSubmitted.SCHEMA_VERSION + 1)),
            None,
            RejectionCode.SCHEMA_INVALID,
            "newer",
            id="newer-schema-version",
        ),
    ],
)
@pytest.mark.parametrize("type_hint", [None, "run.submitted", "decision.made"], ids=["no-hint", "hint", "wrong-hint"])
def test_parse_envelope_rejects_with_the_right_code(
    raw: bytes, max_bytes: int | None, code: RejectionCode, reason_pattern: str, type_hint: str | None
) -> None:
    """parse_envelope raises InvalidMessage carrying the RejectionCode for what is wrong, whatever the type hint."""
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(raw, max_bytes=max_bytes, type_hint=type_hint)
    assert caught.value.code is code
    assert re.search(re.escape(reason_pattern), caught.value.reason), caught.value.reason


@pytest.mark.parametrize(
    "literal",
    [
        b"9007199254740991",
        b"-9007199254740991",
        b"1e308",
        b"1234567890123456.5",
        b'"\\\\u0000 is text"',
        b'"NaN"',
        b'"3e512"',
    ],
)
def test_values_at_the_edge_of_the_rules_are_accepted(literal: bytes) -> None:
    """The largest exact integers, the largest finite exponent, and look-alikes inside strings all parse."""
    raw = _with_input(literal)
    assert parse_envelope(raw).data.input["hostile"] == json.loads(literal)
    assert parse_envelope(raw, type_hint="run.submitted") == parse_envelope(raw)


@pytest.mark.parametrize("type_hint", [None, "run.submitted"])
def test_nesting_at_the_limit_is_accepted(type_hint: str | None) -> None:
    """A run input 64 arrays and objects deep (itself and 63 arrays) is fine; one more is not."""
    inside = _with_input(b"[" * 63 + b"]" * 63)
    assert parse_envelope(inside, type_hint=type_hint).data.input["hostile"] is not None
    with pytest.raises(InvalidMessage) as caught:
        parse_envelope(_with_input(b"[" * 64 + b"]" * 64), type_hint=type_hint)
    assert caught.value.code is RejectionCode.TOO_DEEP


def test_message_exactly_at_the_size_limit_is_accepted() -> None:
    """max_bytes is inclusive: a message of exactly that many bytes parses."""
    raw = _valid_bytes()
    assert parse_envelope(raw, max_bytes=len(raw)).type == "run.submitted"


@pytest.mark.parametrize("type_hint", ["run.submitted", "decision.made", "no.such.type"])
def test_a_type_hint_never_changes_what_is_parsed(type_hint: str) -> None:
    """The hint (a Warden-Type header) only speeds parsing up: a wrong one gives the same envelope."""
    assert parse_envelope(VALID, type_hint=type_hint) == parse_envelope(VALID)


def test_a_hinted_message_of_an_older_schema_version_is_still_upcast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass parse would accept an old payload that happens to fit the new model: it must not skip upcasting."""
    monkeypatch.setattr(RunSubmitted, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(UPCASTERS, ("run.submitted", 1), lambda data: {**data, "labels": {"upcast": "v1-to-v2"}})
    envelope = parse_envelope(VALID, type_hint="run.submitted")
    assert envelope.schema_version == 2
    assert envelope.data.labels == {"upcast": "v1-to-v2"}


def test_an_envelope_written_before_entity_id_was_named_so_is_still_read() -> None:
    """A stored envelope with the old `subject` field parses, hinted or not, with that value as its entity_id."""
    current = json.loads(VALID)
    old = {("subject" if key == "entity_id" else key): value for key, value in current.items()}
    raw = json.dumps(old).encode()
    for hint in (None, "run.submitted"):
        envelope = parse_envelope(raw, type_hint=hint)
        assert envelope.entity_id == current["entity_id"]
    both = json.dumps({**current, "subject": "other"}).encode()
    with pytest.raises(InvalidMessage):
        parse_envelope(both)  # a new envelope may not carry the old field as well: unknown fields are refused


# --- (f) property: random valid payloads round-trip ---------------------------------------------


@given(
    payload=st.one_of(run_submitted(), tool_call_requested()),
    fields=envelope_fields(),
    caused=st.booleans(),
)
def test_random_valid_payloads_round_trip(payload: Payload, fields: dict[str, Any], caused: bool) -> None:
    """Any valid run.submitted or tool_call.requested survives to_bytes/parse_envelope and meets its schema."""
    cause = envelope_of(EXAMPLES["run.submitted"]) if caused else None
    envelope: Envelope[Any] = make_envelope(payload, caused_by=cause, **fields)
    raw = envelope.to_bytes()
    assert parse_envelope(raw) == envelope
    assert schema_errors(payload.TYPE, json.loads(raw)) == []


# --- the AsyncAPI document hangs together --------------------------------------------------------


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        # A JSON pointer in a URI fragment: percent-encoded (FastStream writes `Envelope%5BRunDispatched%5D`).
        node = node[unquote(part).replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def test_asyncapi_document_is_consistent() -> None:
    """Every $ref resolves, each declared channel has its operation, every payload is described, and
    the catalogue's subjects and message types are all in it."""
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "Warden"
    assert document["info"]["version"]
    for ref in _refs(document):
        _resolve(document, ref)
    declared = [make("warden") for make in SERVICE_CHANNELS]
    expected = {title: "receive" for service in declared for title in service.received}
    expected |= {title: "send" for service in declared for title in service.sent}
    expected[ADVISORIES_TITLE] = "receive"  # the projector's one subscriber with a handler
    assert {name: operation["action"] for name, operation in document["operations"].items()} == expected
    for operation_id, operation in document["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        assert channel_ref == f"#/channels/{operation_id}"
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), operation_id
    for name, message in document["components"]["messages"].items():
        assert set(_resolve(document, message["payload"]["$ref"])) != {"title"}, f"{name} has no payload schema"
    addresses = {channel["address"] for channel in document["channels"].values()}
    for channel in CHANNELS:
        assert channel.pattern.replace("{prefix}", "warden") in addresses, channel.name
    titles = json.dumps(document["components"]["schemas"])
    for model in MESSAGE_TYPES.values():
        assert f'"title": "{model.__name__}"' in titles, model.TYPE
