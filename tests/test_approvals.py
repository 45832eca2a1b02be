"""Human approvals: a call the policy puts in front of a human waits durably, runs only on an answer that
counts, bound to its exact arguments and policy revision, and is refused once its approval expires."""

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from pydantic import JsonValue

from tests.conftest import REPO_ROOT, AppRunner, eventually, warden_cli
from tests.test_governed_run import run_events, run_row, start_all
from tests.test_stack import operator, start_stack, stop_stack
from warden.agent_runner.approvals import Answered, Awaiting, Void, approval_state
from warden.client import WardenClient
from warden.messages import (
    ApprovalAnswered,
    ApprovalRequested,
    AwaitedApproval,
    DecisionMade,
    Envelope,
    RunDispatched,
    RunPaused,
    RunResumed,
    RunSubmitted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
)
from warden.offline_model import OfflineModelServer
from warden.policy_gate.app import build_app as build_gate
from warden.policy_gate.decide import PolicyDecider
from warden.policy_gate.engine import PolicyEngine
from warden.scheduler.core import SchedulerState, due_resumes, evolve
from warden.settings import Settings
from warden.signing import SIGNING_KEY_FILE, DecisionSigner, arguments_hash, create_signing_key
from warden.timeline import run_timeline

REFUND: dict[str, JsonValue] = {"order": "A-1001", "amount": 42.5}


def policies_with(tmp_path: Path, **approvals: Any) -> Path:
    """The shipped pack with `approvals` merged into `data.warden.approvals`."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policy_dir)
    data = json.loads((policy_dir / "data.json").read_text(encoding="utf-8"))
    data["warden"]["approvals"] |= approvals
    (policy_dir / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return policy_dir


async def paused(nc: NatsClient, settings: Settings, run_id: str) -> list[Envelope[Any]]:
    """The run's events once it has paused (empty until then)."""
    events = await run_events(nc, settings, "acme", run_id)
    return events if any(isinstance(event.data, RunPaused) for event in events) else []


async def paused_refund(nc: NatsClient, settings: Settings) -> tuple[WardenClient, str, str]:
    """carol's refund, submitted and paused on its approval: a client, the run id and the approval id."""
    client = WardenClient(nc, settings.subject_prefix)
    run_id = await submit_refund(client)
    events = await eventually(lambda: paused(nc, settings, run_id), within=30)
    approval_id = next(e.data.approval_id for e in events if isinstance(e.data, ApprovalRequested))
    return client, run_id, approval_id


async def submit_refund(client: WardenClient, **refund: Any) -> str:
    receipt = await client.submit_run(tenant="acme", agent="refunds", actor="carol", input=refund or REFUND)
    return receipt.run_id


async def test_a_refund_waits_without_a_slot_and_runs_once_another_principal_approves(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """carol asks for a refund: it waits, holding no runner slot (a second run goes through the one slot
    meanwhile). bob (no approver role) and carol herself (four eyes) answer, and neither answer counts;
    dana's does: the refund runs under her decision, and the audit says who approved what, and when."""
    one_slot = settings.model_copy(update={"runner_concurrency": 1})
    await start_all(run_app, one_slot)
    client = WardenClient(nc, settings.subject_prefix)
    run_id = await submit_refund(client)
    events = await eventually(lambda: paused(nc, settings, run_id), within=30)

    requests = [event.data for event in events if isinstance(event.data, ApprovalRequested)]
    assert len(requests) == 1
    request = requests[0]
    asked = next(e.data for e in events if isinstance(e.data, DecisionMade) and e.data.effect == "require_approval")
    assert request.approval_id == asked.decision_id
    assert request.decision == asked
    assert (request.tool, request.arguments) == ("payments.refund", REFUND)
    assert request.arguments_hash == arguments_hash(REFUND) == asked.arguments_hash
    assert request.policy_revision == asked.policy_revision
    assert request.requested_by == "carol"
    assert request.approver_roles == ["approver"]
    assert timedelta(minutes=29) < request.expires_at - datetime.now(UTC) <= timedelta(minutes=30)
    pause = next(e.data for e in events if isinstance(e.data, RunPaused))
    assert [waiting.tool_call_id for waiting in pause.awaiting] == [request.tool_call_id]

    # The one runner slot is free: another run starts and finishes while the refund waits.
    other = await client.submit_run(tenant="acme", agent="demo", actor="alice")
    assert (await eventually(await run_row(db, other.run_id, ("succeeded", "failed")), within=30))["status"] == (
        "succeeded"
    )

    assert [(found.request.approval_id, found.status) for found in await client.approval_requests("acme")] == [
        (request.approval_id, "pending")
    ]

    by_bob = await client.answer_approval(tenant="acme", approval_id=request.approval_id, actor="bob", approve=True)
    assert (by_bob.effect, by_bob.counted) == ("require_approval", False)
    assert "none of them may approve payments.refund" in " ".join(by_bob.reasons)
    by_carol = await client.answer_approval(tenant="acme", approval_id=request.approval_id, actor="carol", approve=True)
    assert by_carol.effect == "require_approval"
    assert "carol asked for this run and may not answer its own request (four eyes)" in by_carol.reasons
    assert not any(isinstance(e.data, RunResumed) for e in await run_events(nc, settings, "acme", run_id))

    by_dana = await client.answer_approval(
        tenant="acme", approval_id=request.approval_id, actor="dana", approve=True, reason="customer verified"
    )
    assert (by_dana.effect, by_dana.counted) == ("allow", True)
    assert by_dana.reasons[0] == "approved by dana: customer verified"
    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]

    events = await run_events(nc, settings, "acme", run_id)
    answer = next(
        e.data
        for e in events
        if isinstance(e.data, DecisionMade)
        and e.data.request_type == ApprovalAnswered.TYPE
        and e.data.effect == "allow"
    )
    refund = next(e.data for e in events if isinstance(e.data, ToolCallCompleted) and e.data.tool == "payments.refund")
    assert (refund.outcome, refund.decision_id) == ("ok", answer.decision_id)
    assert refund.result == {**REFUND, "status": "refunded", "offline": True}
    # Bound to the call it approves: its arguments hash, the request's expiry.
    assert (answer.tool_call_id, answer.arguments_hash, answer.expires_at) == (
        request.tool_call_id,
        request.arguments_hash,
        request.expires_at,
    )
    assert sum(isinstance(e.data, RunResumed) for e in events) == 1
    # The policy sees earlier approvals: the call after the refund carries it as approved.
    echo_row = await eventually(
        lambda: db.fetchrow(
            "SELECT payload FROM events WHERE entity_id = $1 AND type = 'tool_call.requested' "
            "AND payload->>'tool' = 'text.echo'",
            run_id,
        )
    )
    echo = ToolCallRequested.model_validate_json(echo_row["payload"])
    assert [(fact.tool, fact.outcome, fact.approved) for fact in echo.history] == [("payments.refund", "ok", True)]

    await audit_tells_who_approved(db, client, run_id, request)


async def audit_tells_who_approved(
    db: asyncpg.Connection, client: WardenClient, run_id: str, request: ApprovalRequested
) -> None:
    """The approvals view and the run's timeline say who approved what, and when."""
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT * FROM approvals WHERE approval_id = $1 AND status <> 'pending'", request.approval_id
        )
    )
    assert (row["status"], row["answered_by"], row["answer_reason"], row["requested_by"]) == (
        "approved",
        "dana",
        "customer verified",
        "carol",
    )
    assert row["answered_at"] >= row["requested_at"]
    assert await client.approval_requests("acme") == []

    timeline = "\n".join(await run_timeline(db, "acme", run_id))
    assert "awaits approval" in timeline
    assert "bob APPROVES" in timeline
    assert "dana APPROVES approval" in timeline
    assert "customer verified" in timeline
    assert "REQUIRE_APPROVAL answer on tool call" in timeline  # bob's and carol's, which did not count


async def test_a_rejected_refund_is_refused_on_the_record(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """dana rejects: the call is refused with her reason and, as the refunds agent fails on a refusal, so is the run."""
    await start_all(run_app, settings)
    client, run_id, approval_id = await paused_refund(nc, settings)
    answered = await client.answer_approval(
        tenant="acme", approval_id=approval_id, actor="dana", approve=False, reason="order already refunded"
    )
    assert (answered.effect, answered.counted) == ("deny", True)
    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "failed"
    completed = [
        e.data for e in await run_events(nc, settings, "acme", run_id) if isinstance(e.data, ToolCallCompleted)
    ]
    assert [(call.tool, call.outcome) for call in completed] == [("payments.refund", "refused")]
    assert "rejected by dana: order already refunded" in (completed[0].error or "")


async def test_a_call_still_waiting_at_its_expiry_is_refused_and_a_late_answer_does_not_revive_it(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """With approvals that expire after 2 s and nobody answering, the scheduler resumes the run at expiry
    and the runner refuses the call on the record; an approval that comes after that is denied."""
    short = settings.model_copy(update={"policy_dir": policies_with(tmp_path, expiry_seconds=2)})
    await start_all(run_app, short)
    client, run_id, approval_id = await paused_refund(nc, settings)
    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "failed"
    events = await run_events(nc, settings, "acme", run_id)
    refund = next(e.data for e in events if isinstance(e.data, ToolCallCompleted))
    assert refund.outcome == "refused"
    assert "no answer that counts came before the approval expired" in (refund.error or "")
    assert refund.decision_id == approval_id
    resumed = next(e.data for e in events if isinstance(e.data, RunResumed))
    assert "expired" in resumed.reason

    late = await client.answer_approval(tenant="acme", approval_id=approval_id, actor="dana", approve=True)
    assert late.effect == "deny"
    assert late.reasons[0].startswith("approved by dana after the request expired at")
    statuses = await client.approval_requests("acme", pending_only=False)
    assert [found.status for found in statuses] == ["rejected"]  # the late answer counted, as a deny


async def test_an_approval_given_under_another_policy_revision_does_not_hold(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """The policy changes while the refund waits: dana's approval is made under the new revision, so it does
    not hold for a call asked under the old one, and the call is refused saying so."""
    apps = await start_all(run_app, settings)
    client, run_id, approval_id = await paused_refund(nc, settings)

    await run_app.stop(apps["policy_gate"])
    changed = policies_with(tmp_path)
    (changed / "review.rego").write_text((changed / "review.rego").read_text() + "\n# reviewed again\n")
    await run_app(build_gate(settings.model_copy(update={"policy_dir": changed})))
    answered = await client.answer_approval(tenant="acme", approval_id=approval_id, actor="dana", approve=True)
    assert answered.effect == "allow"

    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "failed"
    refund = next(
        e.data for e in await run_events(nc, settings, "acme", run_id) if isinstance(e.data, ToolCallCompleted)
    )
    assert refund.outcome == "refused"
    assert "the policy changed in between, so the approval does not hold" in (refund.error or "")


@pytest.fixture
async def model_server() -> Any:
    async with OfflineModelServer(models=("warden-test-model",)) as server:
        yield server


async def test_several_calls_of_one_turn_await_approval_at_once(
    settings: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
    tmp_path: Path,
    model_server: OfflineModelServer,
) -> None:
    """A model asks for two refunds in one turn: both await approval together; the run stays paused until
    both are answered, then runs both, in order, and finishes."""
    agents_dir = tmp_path / "agents"
    agents_dir.mkdir()
    agent = {
        "name": "refunds",
        "kind": "llm",
        "model": "warden-test-model",
        "endpoint": {"base_url": model_server.base_url, "timeout_seconds": 5.0, "max_retries": 0},
        "tools": ["payments.refund", "text.echo"],
        "max_steps": 5,
    }
    (agents_dir / "refunds.json").write_text(json.dumps(agent), encoding="utf-8")
    await start_all(run_app, settings.model_copy(update={"agents_dir": agents_dir}))
    client = WardenClient(nc, settings.subject_prefix)
    prompt = (
        'CALL payments__refund {"order": "A-1", "amount": 10}\nCALL payments__refund {"order": "A-2", "amount": 20}'
    )
    receipt = await client.submit_run(tenant="acme", agent="refunds", actor="carol", input={"prompt": prompt})
    events = await eventually(lambda: paused(nc, settings, receipt.run_id), within=30)
    requests = [e.data for e in events if isinstance(e.data, ApprovalRequested)]
    assert [request.arguments for request in requests] == [
        {"order": "A-1", "amount": 10},
        {"order": "A-2", "amount": 20},
    ]
    pause = next(e.data for e in events if isinstance(e.data, RunPaused))
    assert len(pause.awaiting) == 2
    assert len(await client.approval_requests("acme")) == 2

    second = await client.answer_approval(
        tenant="acme", approval_id=requests[1].approval_id, actor="dana", approve=True
    )
    assert second.counted
    # One is still unanswered: the run stays put.
    assert not any(isinstance(e.data, RunResumed) for e in await run_events(nc, settings, "acme", receipt.run_id))
    first = await client.answer_approval(tenant="acme", approval_id=requests[0].approval_id, actor="dana", approve=True)
    assert first.counted

    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]
    completed = [
        e.data for e in await run_events(nc, settings, "acme", receipt.run_id) if isinstance(e.data, ToolCallCompleted)
    ]
    refunded = {"status": "refunded", "offline": True}
    assert [(call.result, call.outcome) for call in completed] == [
        ({"order": "A-1", "amount": 10, **refunded}, "ok"),
        ({"order": "A-2", "amount": 20, **refunded}, "ok"),
    ]


async def test_the_cli_lists_approves_and_rejects(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """`warden approvals` lists what waits; `warden approve` answers as the actor and says whether it counted."""
    await start_all(run_app, settings)
    _, run_id, approval_id = await paused_refund(nc, settings)
    listed = await warden_cli(settings, "approvals", "--tenant", "acme")
    assert approval_id in listed
    assert "payments.refund" in listed
    as_json = [
        json.loads(line)
        for line in (await warden_cli(settings, "approvals", "--tenant", "acme", "--json")).splitlines()
    ]
    assert [(found["approval_id"], found["status"], found["requested_by"]) for found in as_json] == [
        (approval_id, "pending", "carol")
    ]
    answered = json.loads(await warden_cli(settings, "approve", approval_id, "--tenant", "acme", "--actor", "dana"))
    assert (answered["counted"], answered["decision"]) == (True, "allow")
    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]
    assert "no pending approval requests" in await warden_cli(settings, "approvals", "--tenant", "acme")


# --- The pure cores ------------------------------------------------------------------------------


def _decision(effect: str, *, answer: bool = False, revision: str = "r1", expires_in: float = 60.0) -> DecisionMade:
    return DecisionMade(
        decision_id=f"d-{effect}-{answer}",
        request_type=ApprovalAnswered.TYPE if answer else ToolCallRequested.TYPE,
        request_id="req",
        request_seq=1,
        effect=effect,  # type: ignore[arg-type]
        policy_revision=revision,
        evaluation_ms=0.1,
        tool_call_id="tc1-x",
        arguments_hash="sha256:a",
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )


def test_approval_state_takes_the_first_answer_that_counts_and_checks_it_when_the_call_is_about_to_run() -> None:
    now = datetime.now(UTC)
    asked = _decision("require_approval")
    assert approval_state([_decision("allow")], now) is None  # never needed approval
    assert approval_state([asked], now) == Awaiting(asked)
    not_counted = _decision("require_approval", answer=True)
    assert approval_state([asked, not_counted], now) == Awaiting(asked)
    approved = _decision("allow", answer=True)
    assert approval_state([asked, not_counted, approved, _decision("deny", answer=True)], now) == Answered(approved)
    rejected = _decision("deny", answer=True)
    assert approval_state([asked, rejected, approved], now) == Answered(rejected)
    expired = _decision("require_approval", expires_in=-1)
    assert isinstance(approval_state([expired], now), Void)
    other_policy = _decision("allow", answer=True, revision="r2")
    void = approval_state([asked, other_policy], now)
    assert isinstance(void, Void)
    assert "the policy changed in between" in void.reason
    stale = _decision("allow", answer=True, expires_in=-1)
    assert isinstance(approval_state([asked, stale], now), Void)


def _envelope(payload: Any, run_id: str = "R1") -> Envelope[Any]:
    return make_envelope(payload, tenant="acme", entity_id=run_id, actor="test", source="test")


def test_a_paused_run_frees_its_slot_and_is_resumed_when_answered_or_expired() -> None:
    state = SchedulerState()
    allow = DecisionMade(
        decision_id="d1",
        request_type=RunSubmitted.TYPE,
        request_id="c1",
        request_seq=1,
        effect="allow",
        policy_revision="r1",
        evaluation_ms=0.1,
    )
    evolve(state, _envelope(allow))
    evolve(state, _envelope(RunDispatched(decision_id="d1", agent="refunds", request_seq=1, decision=allow)))
    assert state.running["acme"] == {"R1"}
    soon = datetime.now(UTC) + timedelta(seconds=60)
    awaiting = [AwaitedApproval(approval_id=f"a{i}", tool_call_id=f"tc{i}-x", expires_at=soon) for i in (1, 2)]
    # The answer to one may be stored before the pause that says the run waits for it.
    evolve(state, _envelope(_decision("allow", answer=True).model_copy(update={"tool_call_id": "tc1-x"})))
    evolve(state, _envelope(RunPaused(reason="waits", awaiting=awaiting)))
    assert state.running["acme"] == set()
    assert due_resumes(state, datetime.now(UTC)) == []
    assert due_resumes(state, soon + timedelta(seconds=2)) != []  # tc2's approval expired
    evolve(state, _envelope(_decision("require_approval", answer=True).model_copy(update={"tool_call_id": "tc2-x"})))
    assert due_resumes(state, datetime.now(UTC)) == []  # an answer that does not count changes nothing
    evolve(state, _envelope(_decision("deny", answer=True).model_copy(update={"tool_call_id": "tc2-x"})))
    assert len(due_resumes(state, datetime.now(UTC))) == 1
    resumed = RunResumed(
        reason="answered", resume=1, decision_id="d1", priority=5, agent="refunds", request_seq=1, decision=allow
    )
    evolve(state, _envelope(resumed))
    assert state.queued[("acme", "R1")].resume == 1
    assert due_resumes(state, datetime.now(UTC)) == []


def test_the_gate_answers_only_genuine_approval_requests(tmp_path: Path) -> None:
    """An approval request must carry the gate's signed require_approval decision and say what it binds."""
    engine = PolicyEngine.load(REPO_ROOT / "policies")
    signer = DecisionSigner.from_file(_key(tmp_path))
    decider = PolicyDecider(engine, signer)
    call = _envelope(
        ToolCallRequested(tool_call_id="tc1-x", step=1, agent="refunds", tool="payments.refund", arguments=REFUND)
    ).model_copy(update={"actor": "carol"})
    asked = decider.decide(call, 7)
    assert asked.effect == "require_approval"
    assert asked.expires_at is not None
    request = ApprovalRequested(
        approval_id=asked.decision_id,
        tool_call_id="tc1-x",
        step=1,
        agent="refunds",
        tool="payments.refund",
        arguments=REFUND,
        arguments_hash=asked.arguments_hash or "",
        policy_revision=asked.policy_revision,
        requested_by="carol",
        expires_at=asked.expires_at,
        decision=asked,
    )
    answer = _envelope(ApprovalAnswered(approval_id=asked.decision_id, approval_seq=9, approve=True)).model_copy(
        update={"actor": "dana"}
    )
    assert decider.decide(answer, 11, request).effect == "allow"
    # Another key's decision, or a request that claims another expiry or arguments, is not answered.
    forged = DecisionSigner.from_file(_key(tmp_path / "other"))
    for bad in (
        request.model_copy(update={"decision": PolicyDecider(engine, forged).decide(call, 7)}),
        request.model_copy(update={"expires_at": asked.expires_at + timedelta(days=30)}),
        request.model_copy(update={"arguments_hash": arguments_hash({"order": "A-1001", "amount": 9999})}),
    ):
        refused = decider.decide(answer, 11, bad)
        assert (refused.effect, refused.tool_call_id) == ("deny", None)
    missing = decider.decide(answer, 11, "no approval request a at events sequence 9")
    assert (missing.effect, missing.reasons) == ("deny", ["no approval request a at events sequence 9"])


def _key(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    create_signing_key(directory)
    return directory / SIGNING_KEY_FILE


async def test_an_approval_survives_a_restart_of_every_service_nats_and_postgres(tmp_path: Path) -> None:
    """A refund waits; the whole stack stops (NATS and Postgres too) and starts again; the request is still
    pending, dana approves it, and it runs."""
    process, nats_url, _ = await start_stack(tmp_path / "state")
    try:
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            run_id = await submit_refund(client)
            [waiting] = await eventually(lambda: client.approval_requests("acme"), within=60)
            assert waiting.run_id == run_id
    finally:
        assert await stop_stack(process) == 0

    process, nats_url, database_url = await start_stack(tmp_path / "state")
    try:
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            [still] = await client.approval_requests("acme")
            assert still.request.approval_id == waiting.request.approval_id
            answered = await client.answer_approval(
                tenant="acme", approval_id=still.request.approval_id, actor="dana", approve=True, wait_seconds=30
            )
            assert answered.counted
        db = await asyncpg.connect(database_url)
        try:
            run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=60)
            assert run["status"] == "succeeded", run["error"]
        finally:
            await db.close()
    finally:
        await stop_stack(process)


async def test_a_cancelled_run_closes_its_pending_approval(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """alice cancels carol's paused refund: the run ends cancelled without the call, and its request is no
    longer pending, in the client's listing or in the approvals view."""
    await start_all(run_app, settings)
    client, run_id, approval_id = await paused_refund(nc, settings)
    cancelled = await client.cancel_run(tenant="acme", run_id=run_id, actor="alice", reason="customer withdrew")
    assert cancelled.effect == "allow"
    await eventually(await run_row(db, run_id, ("cancelled",)), within=30)
    assert await client.approval_requests("acme") == []
    row = await eventually(
        lambda: db.fetchrow("SELECT status FROM approvals WHERE approval_id = $1 AND status = 'closed'", approval_id)
    )
    assert row["status"] == "closed"
    events = await run_events(nc, settings, "acme", run_id)
    assert not any(isinstance(e.data, ToolCallCompleted) for e in events)
