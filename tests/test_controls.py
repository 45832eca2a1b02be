"""Cancel and kill switch: a cancelled run ends `cancelled` and starts no call after; a halt stops every
run in its scope within a second of being stored, holds queued ones until it is lifted, and survives
restarts; only principals allowed to stop work can, and only the gate's signed decisions count."""

import asyncio
import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import nacl.signing
import pytest
from faststream import FastStream
from nats.aio.client import Client as NatsClient

from tests.conftest import REPO_ROOT, AppRunner, eventually, run_warden_cli, warden_cli
from tests.test_governed_run import BUILDERS, run_events, run_row
from warden.agent_runner.agents import SHIPPED_AGENTS_DIR
from warden.client import WardenClient
from warden.controls import TENANT_SCOPE, ControlView, control_hash, scope_token
from warden.messages import (
    DecisionMade,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    RunCancelled,
    RunCancelRequested,
    RunDispatched,
    RunQueued,
    RunStarted,
    RunSubmitted,
    make_envelope,
)
from warden.scheduler.core import QueuedRun, SchedulerState, cancelled_runs, evolve, next_dispatches
from warden.settings import Settings
from warden.signing import DecisionBinding, DecisionSigner, DecisionVerifier
from warden.subjects import Subjects

# A scripted agent of many short sleeps: whatever moment a stop comes, a call is about to start.
SLEEPS = 30
SLEEPY = {
    "name": "sleepy",
    "description": "Sleeps a tenth of a second, thirty times: a run that is always about to call a tool.",
    "on_refusal": "fail",
    "steps": [{"tool_call": {"tool": "clock.sleep", "arguments": {"seconds": 0.1}}}] * SLEEPS,
    "output": None,
}
CALL_TYPES = ("tool_call.requested", "model_call.requested")


@pytest.fixture
def controlled(settings: Settings, tmp_path: Path) -> Settings:
    """The shipped agents and policies, plus `sleepy`, which operators may run."""
    agents_dir, policy_dir = tmp_path / "agents", tmp_path / "policies"
    shutil.copytree(SHIPPED_AGENTS_DIR, agents_dir)
    (agents_dir / "sleepy.json").write_text(json.dumps(SLEEPY), encoding="utf-8")
    shutil.copytree(REPO_ROOT / "policies", policy_dir)
    data = json.loads((policy_dir / "data.json").read_text(encoding="utf-8"))
    data["warden"]["agents"]["sleepy"] = {"tools": ["clock.sleep"], "max_tool_calls": 100}
    data["warden"]["roles"]["operator"]["agents"].append("sleepy")
    (policy_dir / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return settings.model_copy(update={"agents_dir": agents_dir, "policy_dir": policy_dir})


async def start(run_app: AppRunner, settings: Settings, *names: str) -> dict[str, FastStream]:
    apps = {name: BUILDERS[name](settings) for name in names or BUILDERS}
    for app in apps.values():
        await run_app(app)
    return apps


async def stop(apps: dict[str, FastStream], *names: str) -> None:
    for name in names:
        apps[name].exit()
    await asyncio.sleep(0)


async def started(db: asyncpg.Connection, run_id: str, calls: int = 1) -> bool:
    """Whether at least `calls` tool calls of the run are recorded (read from the audit: tailing a busy
    run's events waits for a pause in them)."""
    try:
        found = await db.fetchval(
            "SELECT count(*) FROM events WHERE entity_id = $1 AND type = 'tool_call.completed'", run_id
        )
    except asyncpg.UndefinedTableError:
        return False
    return bool(found >= calls)


async def types_of(nc: NatsClient, settings: Settings, run_id: str) -> list[str]:
    return [event.type for event in await run_events(nc, settings, "acme", run_id)]


async def last_call_after(db: asyncpg.Connection, run_ids: list[str], stored_at: datetime) -> timedelta:
    """How long after `stored_at` the last model or tool call of these runs was stored (negative: before)."""
    last = await db.fetchval(
        "SELECT max(stored_at) FROM events WHERE entity_id = ANY($1) AND type = ANY($2)", run_ids, list(CALL_TYPES)
    )
    assert last is not None
    return last - stored_at  # type: ignore[no-any-return]


async def decision_stored_at(db: asyncpg.Connection, decision_id: str) -> datetime:
    """When JetStream stored a decision (its stream timestamp, as the projector recorded it)."""

    async def stored() -> Any:
        return await db.fetchval(
            "SELECT stored_at FROM events WHERE type = 'decision.made' AND payload->>'decision_id' = $1", decision_id
        )

    return await eventually(stored, within=15)  # type: ignore[no-any-return]


async def test_a_cancelled_run_ends_cancelled_and_starts_no_call_after(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """alice cancels a run under way: it ends `cancelled` with her reason, no call of it is stored more than
    a second after the cancel's decision, and the audit shows who cancelled it and why."""
    await start(run_app, controlled)
    client = WardenClient(nc, controlled.subject_prefix)
    run_id = (await client.submit_run(tenant="acme", agent="sleepy", actor="alice")).run_id
    await eventually(lambda: started(db, run_id, calls=3), within=30)

    cancel = await client.cancel_run(tenant="acme", run_id=run_id, actor="alice", reason="wrong input")
    assert cancel.in_force, cancel.reasons
    assert cancel.reasons[0] == "cancelled by alice: wrong input"
    run = await eventually(await run_row(db, run_id, ("succeeded", "failed", "cancelled")), within=15)
    assert (run["status"], run["error"]) == ("cancelled", "cancelled by alice: wrong input")
    assert run["finished_at"] is not None

    events = await run_events(nc, controlled, "acme", run_id)
    ended = [event.data for event in events if isinstance(event.data, RunCancelled)]
    assert [(end.decision_id, end.control) for end in ended] == [(cancel.decision_id, "cancel")]
    assert events[-1].type == RunCancelled.TYPE
    assert sum(event.type == "tool_call.completed" for event in events) < SLEEPS
    assert await last_call_after(db, [run_id], await decision_stored_at(db, cancel.decision_id or "")) < timedelta(
        seconds=1
    )


async def test_a_cancelled_queued_run_never_starts(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """With one slot per tenant, a run waits in the queue; cancelled there, it ends `cancelled` from the
    scheduler and is never dispatched, while the run ahead of it goes on."""
    await start(run_app, controlled.model_copy(update={"tenant_concurrency": 1}))
    client = WardenClient(nc, controlled.subject_prefix)
    ahead = (await client.submit_run(tenant="acme", agent="sleepy", actor="alice")).run_id
    queued = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    await eventually(lambda: _has(nc, controlled, queued, RunQueued.TYPE), within=15)
    assert RunDispatched.TYPE not in await types_of(nc, controlled, queued)

    cancel = await client.cancel_run(tenant="acme", run_id=queued, actor="alice", reason="not needed")
    assert cancel.in_force
    run = await eventually(await run_row(db, queued, ("succeeded", "failed", "cancelled")), within=15)
    assert (run["status"], run["error"]) == ("cancelled", "cancelled by alice: not needed")
    assert run["started_at"] is None
    assert run["dispatched_at"] is None
    first = await eventually(await run_row(db, ahead, ("succeeded", "failed", "cancelled")), within=60)
    assert first["status"] == "succeeded", first["error"]
    types = await types_of(nc, controlled, queued)
    assert RunDispatched.TYPE not in types
    assert RunStarted.TYPE not in types
    assert types.count(RunCancelled.TYPE) == 1


async def _has(nc: NatsClient, settings: Settings, run_id: str, type_name: str) -> bool:
    return type_name in await types_of(nc, settings, run_id)


async def test_a_halt_stops_its_tenant_within_a_second_holds_the_queue_and_resume_lets_it_go(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """alice halts tenant acme: the two runs under way end `cancelled` and no call of theirs is stored more
    than a second after the halt's decision; a queued run and one submitted during the halt never start;
    another tenant's run is untouched; once she resumes, the held runs run."""
    await start(run_app, controlled.model_copy(update={"tenant_concurrency": 2}))
    client = WardenClient(nc, controlled.subject_prefix)
    running = [(await client.submit_run(tenant="acme", agent="sleepy", actor="alice")).run_id for _ in range(2)]
    queued = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    for run_id in running:
        await eventually(lambda run_id=run_id: started(db, run_id, calls=2), within=30)  # type: ignore[misc]
    await eventually(lambda: _has(nc, controlled, queued, RunQueued.TYPE), within=15)

    halt = await client.halt(tenant="acme", actor="alice", reason="incident 42")
    assert halt.in_force, halt.reasons
    assert halt.reasons[0] == "tenant acme halted by alice: incident 42"
    other = (await client.submit_run(tenant="globex", agent="demo", actor="gina")).run_id
    during = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    for run_id in running:
        run = await eventually(await run_row(db, run_id, ("succeeded", "failed", "cancelled")), within=15)
        assert (run["status"], run["error"]) == ("cancelled", "tenant acme halted by alice: incident 42")
    halted_at = await decision_stored_at(db, halt.decision_id or "")
    assert await last_call_after(db, running, halted_at) < timedelta(seconds=1)
    assert (await eventually(await run_row(db, other, ("succeeded", "failed")), within=30))["status"] == "succeeded"

    assert list(await client.halts("acme")) == [TENANT_SCOPE]
    await asyncio.sleep(1.5)  # the scheduler acts at least twice a second: time enough to dispatch, were it to
    for held in (queued, during):
        types = await types_of(nc, controlled, held)
        assert RunQueued.TYPE in types, types
        assert RunDispatched.TYPE not in types, types

    lift = await client.lift_halt(tenant="acme", actor="alice", reason="incident over")
    assert lift.in_force
    assert lift.reasons[0] == "tenant acme halt lifted by alice: incident over"
    for held in (queued, during):
        run = await eventually(await run_row(db, held, ("succeeded", "failed", "cancelled")), within=30)
        assert run["status"] == "succeeded", run["error"]
    assert await client.halts("acme") == {}


async def test_a_halt_of_one_agent_spares_the_others(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A halt of agent sleepy ends its run under way and holds a new one; a demo run of the same tenant
    runs meanwhile."""
    await start(run_app, controlled)
    client = WardenClient(nc, controlled.subject_prefix)
    sleepy = (await client.submit_run(tenant="acme", agent="sleepy", actor="alice")).run_id
    await eventually(lambda: started(db, sleepy), within=30)
    halt = await client.halt(tenant="acme", agent="sleepy", actor="alice", reason="misbehaving")
    assert halt.in_force
    assert halt.reasons[0] == "agent sleepy of tenant acme halted by alice: misbehaving"
    run = await eventually(await run_row(db, sleepy, ("succeeded", "failed", "cancelled")), within=15)
    assert (run["status"], run["error"]) == ("cancelled", "agent sleepy of tenant acme halted by alice: misbehaving")
    held = (await client.submit_run(tenant="acme", agent="sleepy", actor="alice")).run_id
    demo = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    assert (await eventually(await run_row(db, demo, ("succeeded", "failed")), within=30))["status"] == "succeeded"
    await eventually(lambda: _has(nc, controlled, held, RunQueued.TYPE), within=15)
    assert RunDispatched.TYPE not in await types_of(nc, controlled, held)
    assert list(await client.halts("acme")) == [scope_token("sleepy")]
    lifted = await client.lift_halt(tenant="acme", agent="sleepy", actor="alice")
    assert lifted.in_force
    await eventually(lambda: started(db, held), within=15)
    await client.cancel_run(tenant="acme", run_id=held, actor="alice")


async def test_a_halt_survives_a_restart_of_the_scheduler_and_runner(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Halted, then the scheduler and runner restarted: they rebuild the halt from the stream, so a run
    submitted after the restart is held, and the lift lets it go."""
    apps = await start(run_app, controlled)
    client = WardenClient(nc, controlled.subject_prefix)
    assert (await client.halt(tenant="acme", actor="alice", reason="maintenance")).in_force
    await stop(apps, "scheduler", "agent_runner")
    await asyncio.sleep(1.0)
    await start(run_app, controlled, "scheduler", "agent_runner")
    run_id = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    await eventually(lambda: _has(nc, controlled, run_id, RunQueued.TYPE), within=15)
    await asyncio.sleep(1.5)
    assert RunDispatched.TYPE not in await types_of(nc, controlled, run_id)
    assert (await client.lift_halt(tenant="acme", actor="alice")).in_force
    assert (await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30))["status"] == "succeeded"


async def test_only_principals_with_the_control_may_stop_work(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """bob (viewer) may neither halt nor cancel: the gate denies both, on the record, and the run goes on."""
    await start(run_app, controlled)
    client = WardenClient(nc, controlled.subject_prefix)
    run_id = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    halt = await client.halt(tenant="acme", actor="bob", reason="because")
    assert (halt.effect, halt.reasons) == (
        "deny",
        ["principal bob in tenant acme has roles [viewer]; none of them may halt"],
    )
    cancel = await client.cancel_run(tenant="acme", run_id=run_id, actor="bob")
    assert cancel.effect == "deny"
    assert (await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30))["status"] == "succeeded"
    assert await client.halts("acme") == {}


async def test_the_cli_halts_lists_and_resumes_and_says_when_it_was_refused(
    controlled: Settings, run_app: AppRunner
) -> None:
    """`warden halt` prints the gate's decision and exits 1 when refused; `warden halts` lists the halt in
    force; `warden resume` lifts it; `warden cancel` names the run it stops."""
    await start(run_app, controlled, "policy_gate")
    refused = await run_warden_cli(controlled, "halt", "--tenant", "acme", "--actor", "bob", "--reason", "why not")
    assert refused.status == 1
    assert json.loads(refused.stdout)["decision"] == "deny"
    halted = json.loads(
        await warden_cli(controlled, "halt", "--tenant", "acme", "--agent", "slow", "--actor", "alice", "--reason", "r")
    )
    assert (halted["decision"], halted["agent"]) == ("allow", "slow")
    assert halted["reasons"][0] == "agent slow of tenant acme halted by alice: r"
    listed = [json.loads(line) for line in (await warden_cli(controlled, "halts", "--tenant", "acme")).splitlines()]
    assert [(found["scope"], found["decision_id"]) for found in listed] == [("agent-slow", halted["decision_id"])]
    resumed = json.loads(
        await warden_cli(controlled, "resume", "--tenant", "acme", "--agent", "slow", "--actor", "alice")
    )
    assert resumed["decision"] == "allow"
    assert await warden_cli(controlled, "halts", "--tenant", "acme", "--json") == ""
    cancelled = json.loads(await warden_cli(controlled, "cancel", "R1", "--tenant", "acme", "--actor", "alice"))
    assert (cancelled["run_id"], cancelled["decision"], cancelled["reasons"][0]) == (
        "R1",
        "allow",
        "cancelled by alice",
    )


async def test_a_forged_halt_is_not_obeyed(
    controlled: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Decisions on halts written by someone other than the gate (another key, none, or a genuine signature
    on another decision copied to a halt's subject) halt nothing: runs go on."""
    await start(run_app, controlled)
    client = WardenClient(nc, controlled.subject_prefix)
    first = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    assert (await eventually(await run_row(db, first, ("succeeded", "failed")), within=30))["status"] == "succeeded"
    genuine = next(
        event.data
        for event in await run_events(nc, controlled, "acme", first)
        if isinstance(event.data, DecisionMade) and event.data.request_type == RunSubmitted.TYPE
    )
    attacker = DecisionSigner(nacl.signing.SigningKey.generate())
    subjects = Subjects(controlled.subject_prefix)
    forgeries = [
        _halt_decision(attacker, signed=True),
        _halt_decision(attacker, signed=False),
        # The gate's own signature on the run's allow, passed off as a cancel of that run.
        genuine.model_copy(update={"request_type": RunCancelRequested.TYPE}),
    ]
    for forged in forgeries:
        entity = first if forged.request_type == RunCancelRequested.TYPE else TENANT_SCOPE
        envelope = make_envelope(forged, tenant="acme", entity_id=entity, actor="policy-gate", source="policy-gate")
        await nc.jetstream().publish(subjects.expected_subject(envelope), envelope.to_bytes())
    run_id = (await client.submit_run(tenant="acme", agent="demo", actor="alice")).run_id
    assert (await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30))["status"] == "succeeded"


def _halt_decision(signer: DecisionSigner, *, signed: bool) -> DecisionMade:
    unsigned = DecisionMade(
        decision_id="forged-halt",
        request_type=HaltRequested.TYPE,
        request_id="forged",
        request_seq=1,
        effect="allow",
        reasons=["tenant acme halted by mallory"],
        policy_revision="sha256:forged",
        evaluation_ms=0.1,
        arguments_hash=control_hash(HaltRequested.TYPE, TENANT_SCOPE),
    )
    if not signed:
        return unsigned
    signature = signer.sign(DecisionBinding.of(unsigned, "acme", TENANT_SCOPE))
    return unsigned.model_copy(update={"signing_key": signer.public_key, "signature": signature})


# The pure fold: the view of stops, and what the scheduler does with it.

GATE = DecisionSigner(nacl.signing.SigningKey.generate())
TRUSTED = DecisionVerifier([GATE.public_key])


def _decided(request_type: str, entity_id: str, effect: str = "allow", signer: DecisionSigner = GATE) -> Envelope[Any]:
    unsigned = DecisionMade(
        decision_id=f"d-{request_type.replace('.', '_')}-{entity_id}-{effect}",
        request_type=request_type,
        request_id="r-1",
        request_seq=1,
        effect=effect,  # type: ignore[arg-type]
        reasons=[f"{request_type} of {entity_id}"],
        policy_revision="sha256:test",
        evaluation_ms=0.1,
        arguments_hash=control_hash(request_type, entity_id),
    )
    signature = signer.sign(DecisionBinding.of(unsigned, "acme", entity_id))
    signed = unsigned.model_copy(update={"signing_key": signer.public_key, "signature": signature})
    return make_envelope(signed, tenant="acme", entity_id=entity_id, actor="policy-gate", source="policy-gate")


def test_the_view_folds_halts_lifts_and_cancels_in_order() -> None:
    """A halt is in force until its lift, and again after a second halt; a cancel names one run; denies
    and decisions under an untrusted key change nothing."""
    view = ControlView()
    agent = scope_token("sleepy")
    assert view.apply(_decided(HaltRequested.TYPE, agent), 1, TRUSTED)
    assert view.stop("acme", "R1", "sleepy") is not None
    assert view.stop("acme", "R1", "demo") is None
    assert view.stop("globex", "R1", "sleepy") is None
    assert view.apply(_decided(HaltLiftRequested.TYPE, agent), 2, TRUSTED)
    assert view.stop("acme", "R1", "sleepy") is None
    assert view.apply(_decided(HaltRequested.TYPE, TENANT_SCOPE), 3, TRUSTED)
    assert view.stop("acme", "R9", "demo") is not None
    view.apply(_decided(HaltLiftRequested.TYPE, TENANT_SCOPE), 4, TRUSTED)
    assert not view.apply(_decided(RunCancelRequested.TYPE, "R2", effect="deny"), 5, TRUSTED)
    assert not view.apply(
        _decided(RunCancelRequested.TYPE, "R2", signer=DecisionSigner(nacl.signing.SigningKey.generate())), 6, TRUSTED
    )
    assert view.stop("acme", "R2", "demo") is None
    assert view.refused == 1
    assert view.apply(_decided(RunCancelRequested.TYPE, "R2"), 7, TRUSTED)
    stop = view.stop("acme", "R2", "demo")
    assert stop is not None
    assert (stop.kind, stop.reason) == ("cancel", "run.cancel_requested of R2")


def test_agent_names_that_are_not_tokens_get_a_token_of_their_own() -> None:
    """Agent names may hold dots and colons, which subjects may not: those scopes are hashed, distinctly."""
    assert scope_token(None) == TENANT_SCOPE
    assert scope_token("slow") == "agent-slow"
    dotted, coloned = scope_token("web.agent"), scope_token("web:agent")
    assert dotted != coloned
    assert dotted.startswith("agent-h")
    assert "." not in dotted


def _queued(run_id: str, agent: str) -> Envelope[Any]:
    return make_envelope(
        RunQueued(decision_id=f"d-{run_id}", priority=5, agent=agent, request_seq=1),
        tenant="acme",
        entity_id=run_id,
        actor="scheduler",
        source="scheduler",
    )


def test_the_scheduler_holds_halted_runs_and_ends_cancelled_ones() -> None:
    """A halted scope's queued runs are held (not dispatched, not ended); a cancelled queued run is ended;
    once it is recorded `run.cancelled`, the run is finished."""
    state, view = SchedulerState(), ControlView()
    for run_id, agent in (("R1", "sleepy"), ("R2", "demo"), ("R3", "demo")):
        evolve(state, _queued(run_id, agent))
    view.apply(_decided(HaltRequested.TYPE, scope_token("sleepy")), 1, TRUSTED)
    view.apply(_decided(RunCancelRequested.TYPE, "R3"), 2, TRUSTED)
    assert [run.run_id for run in next_dispatches(state, 10, view)] == ["R2", "R3"]
    stopped = cancelled_runs(state, view)
    assert [(found.run_id, found.control.kind) for found in stopped] == [("R3", "cancel")]
    evolve(
        state,
        make_envelope(
            RunCancelled(reason="x", decision_id="d", control="cancel"),
            tenant="acme",
            entity_id="R3",
            actor="scheduler",
            source="scheduler",
        ),
    )
    assert ("acme", "R3") in state.finished
    assert ("acme", "R3") not in state.queued
    assert cancelled_runs(state, view) == []
    held: list[QueuedRun] = [run for run in state.queued.values() if run.agent == "sleepy"]
    assert [run.run_id for run in held] == ["R1"]
    view.apply(_decided(HaltLiftRequested.TYPE, scope_token("sleepy")), 3, TRUSTED)
    assert [run.run_id for run in next_dispatches(state, 10, view)] == ["R1", "R2"]


def test_a_decision_is_filed_under_its_requests_entity() -> None:
    """Decisions on cancels and halts have subjects of their own; those on runs and calls stay where they were."""
    subjects = Subjects("warden")
    halt = _decided(HaltRequested.TYPE, TENANT_SCOPE)
    assert subjects.expected_subject(halt) == "warden.evt.acme.halt._tenant.decision.made"
    cancel = _decided(RunCancelRequested.TYPE, "R1")
    assert subjects.expected_subject(cancel) == "warden.evt.acme.cancel.R1.decision.made"
    run = make_envelope(
        _decided(RunSubmitted.TYPE, "R1").data.model_copy(update={"arguments_hash": None}),
        tenant="acme",
        entity_id="R1",
        actor="policy-gate",
        source="policy-gate",
    )
    assert subjects.expected_subject(run) == "warden.evt.acme.run.R1.decision.made"
