"""Hostile messages on every subject a service reads: each is recorded or refused, and every service keeps serving."""

import json

import asyncpg
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually, warden_cli
from tests.test_governed_run import governed, run_row, start_all
from tests.test_projector import TABLES, stream_total, table_rows
from warden.audit_projector.replay import replay
from warden.bus import envelope_headers
from warden.client import WardenClient
from warden.messages import DecisionMade, RunDispatched, RunSubmitted, make_envelope
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects

__all__ = ["governed"]  # the fixture, imported to be used here

DEEP = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
HUGE = b'{"id": ' + b"9" * 5_000 + b"}"


def allow(run_id: str, request_seq: int) -> DecisionMade:
    return DecisionMade(
        decision_id=f"forged-{run_id}",
        request_type=RunSubmitted.TYPE,
        request_id="x",
        request_seq=request_seq,
        effect="allow",
        policy_revision="forged",
        evaluation_ms=0.0,
    )


async def test_hostile_events_and_work_items_stop_no_service(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Poison on the scheduler's, the runner's and the projector's subjects; a valid run still completes after it."""
    subjects = Subjects(governed.subject_prefix)
    streams = StreamNames.for_prefix(governed.subject_prefix)
    js = nc.jetstream()
    await start_all(run_app, governed)
    garbage_command = await js.publish(subjects.command("acme", RunSubmitted.TYPE), DEEP)
    decision_subject = subjects.event("acme", DecisionMade, "r-poison")

    # The scheduler folds decisions: poison bodies, a body that lies about its tenant, and allow
    # decisions that point at a garbage command, at nothing, and at another run's submission.
    await js.publish(decision_subject, DEEP)
    await js.publish(decision_subject, HUGE)
    other = make_envelope(allow("r-poison", 1), tenant="globex", entity_id="r-poison", actor="x", source="x")
    await js.publish(decision_subject, other.to_bytes())
    for run_id, seq in (("r-garbage", garbage_command.seq), ("r-nothing", 999_999)):
        forged = make_envelope(allow(run_id, seq), tenant="acme", entity_id=run_id, actor="x", source="x")
        await js.publish(subjects.expected_subject(forged), forged.to_bytes(), headers=envelope_headers(forged))
    # The runner takes work items: poison, and a work item of another tenant on acme's subject.
    await js.publish(subjects.work("acme"), DEEP)
    await js.publish(subjects.work("acme"), HUGE)
    elsewhere = make_envelope(
        RunDispatched(decision_id="d", agent="demo", request_seq=1),
        tenant="globex",
        entity_id="r-x",
        actor="x",
        source="x",
    )
    await js.publish(subjects.work("acme"), elsewhere.to_bytes(), headers=envelope_headers(elsewhere, "work-x"))

    client = WardenClient(nc, governed.subject_prefix)
    receipt = await client.submit_run(tenant="acme", agent="demo", actor="alice")
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]
    assert await db.fetchval("SELECT count(*) FROM runs WHERE run_id IN ('r-garbage', 'r-nothing')") == 2
    assert await db.fetchval("SELECT count(*) FROM runs WHERE status = 'queued'") == 0, "no forged run was queued"
    work = await js.stream_info(streams.work)
    assert work.state.messages == 0, "every work item was taken: run, or terminated as invalid"

    # The projector kept every poison message, raw, with its reason; a replay gives the same tables.
    total = await stream_total(nc, governed)
    await eventually(lambda: db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total))
    reasons = [row[0] for row in await db.fetch("SELECT invalid_reason FROM events WHERE raw IS NOT NULL")]
    assert sum(reason.startswith("too_deep") for reason in reasons) == 2
    assert sum(reason.startswith("number_out_of_range") for reason in reasons) == 1
    assert any(reason.startswith("subject_mismatch") for reason in reasons)
    report = await replay(governed, "rebuilt")
    assert (report.events_applied, report.gaps) == (total, ())
    for table in TABLES:
        assert await table_rows(db, "rebuilt", table) == await table_rows(db, "public", table), table

    # `warden tail` shows the poison for what it is and carries on.
    lines = [
        json.loads(line)
        for line in (await warden_cli(governed, "tail", "--tenant", "acme", "--idle-timeout", "1")).splitlines()
    ]
    invalid = [line["invalid"] for line in lines if "invalid" in line]
    assert sum(reason.startswith("too_deep") for reason in invalid) == 1
    assert any(line.get("type") == "run.succeeded" for line in lines)
