"""The user-facing client and CLI against real JetStream: idempotent submits, tailing, envelope round trips."""

import json

import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, warden_cli
from tests.test_projector import publish
from warden.client import CommandTooLarge, IdempotencyKeyTaken, Receipt, WardenClient
from warden.errors import RejectionCode
from warden.messages import RunStarted, RunSubmitted, make_envelope
from warden.policy_gate.app import build_app as build_gate
from warden.settings import Settings
from warden.subjects import Subjects


async def test_submit_with_same_key_is_stored_once(settings: Settings, nc: NatsClient) -> None:
    """Resubmitting with the same idempotency key is acknowledged as a duplicate of the first."""
    client = WardenClient(nc, settings.subject_prefix)
    first = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-42")
    again = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-42")
    other = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-43")
    assert (first.duplicate, again.duplicate, other.duplicate) == (False, True, False)
    assert again.stream_seq == first.stream_seq
    assert other.stream_seq == first.stream_seq + 1


async def test_oversized_command_is_refused_before_sending(settings: Settings, nc: NatsClient) -> None:
    """The client refuses a command over the size limit instead of sending it."""
    client = WardenClient(nc, settings.subject_prefix, max_command_bytes=1024)
    with pytest.raises(CommandTooLarge, match="limit is 1024"):
        await client.submit_run(tenant="acme", agent="demo", actor="alice", input={"blob": "x" * 2000})


async def test_tail_one_run_or_a_whole_tenant(settings: Settings, nc: NatsClient) -> None:
    """Tailing a run yields only its events, in order, as equal envelopes; tailing a tenant yields all of its."""
    sent = []
    for tenant, run_id in [("acme", "r1"), ("acme", "r2"), ("globex", "r1"), ("acme", "r1")]:
        cause = make_envelope(RunSubmitted(agent="demo"), tenant=tenant, entity_id=run_id, actor="a", source="t")
        started = make_envelope(
            RunStarted(decision_id="d1", worker="w"),
            tenant=tenant,
            entity_id=run_id,
            actor="runner",
            source="t",
            caused_by=cause,
        )
        await publish(nc, settings, started)
        sent.append(started)
    client = WardenClient(nc, settings.subject_prefix)
    run_events = [event async for event in client.tail("acme", "r1", idle_timeout=1.0)]
    assert [event.envelope for event in run_events] == [sent[0], sent[3]]
    assert run_events[0].stream_seq < run_events[1].stream_seq
    tenant_events = [event async for event in client.tail("acme", idle_timeout=1.0)]
    assert len(tenant_events) == 3


async def test_cli_submit_and_tail(settings: Settings, nc: NatsClient) -> None:
    """`warden submit` prints a receipt and `warden tail` prints the tenant's events as JSON lines."""
    receipt = json.loads(
        await warden_cli(
            settings,
            "submit",
            "--tenant",
            "acme",
            "--agent",
            "demo",
            "--actor",
            "alice",
            "--input",
            '{"q": 1}',
            "--run-id",
            "cli-run",
        )
    )
    assert receipt == {"run_id": "cli-run", "command_id": receipt["command_id"], "stream_seq": 1, "duplicate": False}
    started = make_envelope(
        RunStarted(decision_id="d1", worker="w"), tenant="acme", entity_id="cli-run", actor="runner", source="t"
    )
    await publish(nc, settings, started)
    lines = (
        await warden_cli(settings, "tail", "--tenant", "acme", "--run", "cli-run", "--idle-timeout", "1")
    ).splitlines()
    assert [json.loads(line)["id"] for line in lines] == [started.id]


async def test_tenants_using_the_same_key_never_collide(settings: Settings, nc: NatsClient) -> None:
    """globex's `ticket-42` is not acme's: each tenant's first submission with that key is stored, as its own run."""
    client = WardenClient(nc, settings.subject_prefix)
    theirs = await client.submit_run(tenant="globex", agent="demo", actor="gina", idempotency_key="ticket-42")
    ours = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-42")
    assert (theirs.duplicate, ours.duplicate) == (False, False)
    assert ours.stream_seq == theirs.stream_seq + 1
    assert ours.run_id != theirs.run_id


async def test_a_repeated_submission_names_the_run_the_first_one_created(settings: Settings, nc: NatsClient) -> None:
    """The retry's receipt is the first submission's: its command, its run, its place in the stream."""
    client = WardenClient(nc, settings.subject_prefix)
    first = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-7")
    again = await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-7")
    assert again == Receipt(first.command_id, first.run_id, first.stream_seq, duplicate=True)


async def test_a_key_claimed_in_another_tenants_scope_is_refused_on_the_record(
    settings: Settings, nc: NatsClient, run_app: AppRunner
) -> None:
    """A globex client that writes acme's scope into its Nats-Msg-Id is rejected by the gate, and acme's client,
    finding its key held by a command not on its own subject (which it does not read), says so rather than
    hand back someone else's receipt."""
    await run_app(build_gate(settings))
    subjects = Subjects(settings.subject_prefix)
    squatter = make_envelope(RunSubmitted(agent="demo"), tenant="globex", entity_id="r-squat", actor="gina", source="t")
    await nc.jetstream().publish(
        subjects.expected_subject(squatter), squatter.to_bytes(), headers={"Nats-Msg-Id": "acme:run.submitted:ticket-9"}
    )
    client = WardenClient(nc, settings.subject_prefix)
    with pytest.raises(IdempotencyKeyTaken, match=r"held by command 1, which is not on .*\.cmd\.acme\."):
        await client.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="ticket-9")
    rejections = [event.envelope async for event in client.tail("globex", idle_timeout=2.0) if event.envelope]
    assert [rejection.data.code for rejection in rejections] == [RejectionCode.IDEMPOTENCY_KEY_OUT_OF_SCOPE.value]
