"""Bad commands are stored, rejected on the record with a clear reason, never retried forever."""

import json

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually
from warden.audit_projector.app import build_app as build_projector
from warden.client import WardenClient
from warden.errors import RejectionCode
from warden.messages import CommandRejected, RunSubmitted, make_envelope
from warden.policy_gate.app import DURABLE_NAME
from warden.policy_gate.app import build_app as build_gate
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects


def valid_submission(tenant: str = "acme") -> bytes:
    envelope = make_envelope(RunSubmitted(agent="demo"), tenant=tenant, entity_id="r1", actor="alice", source="test")
    return envelope.to_bytes()


def with_changes(body: bytes, **changes: object) -> bytes:
    document = json.loads(body)
    document.update(changes)
    return json.dumps(document).encode()


def with_data_changes(body: bytes, **changes: object) -> bytes:
    document = json.loads(body)
    document["data"].update(changes)
    return json.dumps(document).encode()


def with_input_literal(literal: bytes) -> bytes:
    """A valid submission whose run input holds `literal` as raw JSON text (json.dumps could not write it)."""
    body = valid_submission()
    assert b'"input":{}' in body
    return body.replace(b'"input":{}', b'"input":{"hostile":' + literal + b"}", 1)


CASES = [
    pytest.param(b"{not json", RejectionCode.NOT_JSON, "not JSON", id="not-json"),
    pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, RejectionCode.TOO_DEEP, "nested", id="nested-10000"),
    pytest.param(with_input_literal(b"[" * 100 + b"]" * 100), RejectionCode.TOO_DEEP, "nested", id="nested-input"),
    pytest.param(with_input_literal(b"7" * 5000), RejectionCode.NUMBER_OUT_OF_RANGE, "range", id="5000-digits"),
    pytest.param(with_input_literal(b"9007199254740993"), RejectionCode.NUMBER_OUT_OF_RANGE, "2**53", id="past-2**53"),
    pytest.param(with_input_literal(b"1e400"), RejectionCode.NUMBER_OUT_OF_RANGE, "finite", id="overflowing-float"),
    pytest.param(with_input_literal(b"NaN"), RejectionCode.NUMBER_OUT_OF_RANGE, "finite", id="nan"),
    pytest.param(with_input_literal(b'"a\\u0000b"'), RejectionCode.INVALID_STRING, "U+0000", id="nul"),
    pytest.param(with_input_literal(b'"\xc3\x28"'), RejectionCode.NOT_JSON, "not JSON", id="invalid-utf8"),
    pytest.param(b"\xff\xfe binary", RejectionCode.NOT_JSON, "not JSON", id="binary"),
    pytest.param(b"[1, 2]", RejectionCode.SCHEMA_INVALID, "JSON object", id="json-array"),
    pytest.param(
        with_changes(valid_submission(), type="run.teleported"),
        RejectionCode.UNKNOWN_TYPE,
        "unknown message type 'run.teleported'",
        id="unknown-type",
    ),
    pytest.param(
        with_data_changes(valid_submission(), priority=42),
        RejectionCode.SCHEMA_INVALID,
        "data.priority",
        id="schema-out-of-range",
    ),
    pytest.param(
        with_data_changes(valid_submission(), agnet="typo"),
        RejectionCode.SCHEMA_INVALID,
        "data.agnet: Extra inputs are not permitted",
        id="schema-unknown-field",
    ),
    pytest.param(
        with_changes(valid_submission(), tenant="globex"),
        RejectionCode.SUBJECT_MISMATCH,
        "must arrive on",
        id="other-tenant-in-body",
    ),
    pytest.param(
        with_data_changes(valid_submission(), input={"blob": "x" * 70_000}),
        RejectionCode.TOO_LARGE,
        "the limit is 65536",
        id="too-large",
    ),
]


@pytest.mark.parametrize(("body", "code", "reason_part"), CASES)
async def test_bad_command_is_rejected_on_the_record(
    settings: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
    body: bytes,
    code: RejectionCode,
    reason_part: str,
) -> None:
    """A bad command is stored, answered by a command.rejected event with its reason, and projected."""
    subjects = Subjects(settings.subject_prefix)
    await run_app(build_gate(settings))
    await run_app(build_projector(settings))
    ack = await nc.jetstream().publish(
        subjects.command("acme", "run.submitted"), body, headers={"Nats-Msg-Id": "client-key-1"}
    )

    client = WardenClient(nc, settings.subject_prefix)
    events = [event async for event in client.tail("acme", idle_timeout=3.0)]
    rejections = [e.envelope for e in events if e.envelope and isinstance(e.envelope.data, CommandRejected)]
    assert len(rejections) == 1
    rejection = rejections[0].data
    assert isinstance(rejection, CommandRejected)
    assert (rejection.code, rejection.command_stream_seq, rejection.size_bytes) == (code.value, ack.seq, len(body))
    assert reason_part in rejection.reason
    assert rejection.idempotency_key == "client-key-1"
    assert rejections[0].entity_id == str(ack.seq)

    row = await eventually(lambda: db.fetchrow("SELECT * FROM rejected_commands"))
    assert (row["code"], row["command_stream_seq"], row["tenant"]) == (code.value, ack.seq, "acme")
    stored = await eventually(
        lambda: db.fetchrow("SELECT * FROM events WHERE stream_seq = $1 AND stream LIKE '%COMMANDS'", ack.seq)
    )
    # The projector judges the command by the gate's own rules: kept raw, with the same reason.
    assert (stored["raw"], stored["type"]) == (body, None)
    assert stored["invalid_reason"] == f"{code.value}: {rejection.reason}"
    assert await db.fetchval("SELECT count(*) FROM runs") == 0, "a rejected command makes no run row"
    info = await nc.jetstream().consumer_info(StreamNames.for_prefix(settings.subject_prefix).commands, DURABLE_NAME)
    assert info.num_redelivered == 0, "answered on the first delivery"


async def test_gate_keeps_serving_after_bad_input(settings: Settings, nc: NatsClient, run_app: AppRunner) -> None:
    """After a burst of garbage every command is acknowledged once: none pending, none redelivered."""
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    await run_app(build_gate(settings))
    js = nc.jetstream()
    for i in range(20):
        await js.publish(subjects.command("acme", "run.submitted"), b"garbage %d" % i)
    last = await js.publish(subjects.command("acme", "run.submitted"), valid_submission())

    async def settled() -> bool:
        info = await js.consumer_info(streams.commands, DURABLE_NAME)
        return bool(info.delivered.stream_seq == last.seq and info.num_ack_pending == 0 and info.num_pending == 0)

    await eventually(settled)
    info = await js.consumer_info(streams.commands, DURABLE_NAME)
    assert info.num_redelivered == 0
    assert info.config.max_deliver == 5, "a message that keeps failing is not redelivered forever"
    prefix = settings.subject_prefix
    per_subject = (await js.stream_info(streams.events, subjects_filter=f"{prefix}.evt.acme.>")).state.subjects or {}
    rejections = sum(n for subject, n in per_subject.items() if subject.endswith(".command.rejected"))
    assert rejections == 20
    assert per_subject.get(f"{prefix}.evt.acme.run.r1.decision.made") == 1, "the valid command was still decided"


async def test_unattributable_tenant_is_still_recorded(settings: Settings, nc: NatsClient, run_app: AppRunner) -> None:
    """A command whose subject tenant is not a valid tenant id is rejected under `_unattributed`."""
    await run_app(build_gate(settings))
    await nc.jetstream().publish(f"{settings.subject_prefix}.cmd.acme@corp.run.submitted", b"{}")
    client = WardenClient(nc, settings.subject_prefix)
    events = [event async for event in client.tail("_unattributed", idle_timeout=3.0)]
    assert len(events) == 1
    assert events[0].envelope is not None
    assert events[0].envelope.data.code == RejectionCode.SCHEMA_INVALID.value
