"""Governed runs end to end, all four services on real JetStream and Postgres."""

import asyncio
import json
import shutil
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from faststream import FastStream
from nats.aio.client import Client as NatsClient

from tests.conftest import REPO_ROOT, SPANS, AppRunner, eventually, warden_cli
from warden.agent_runner import execution
from warden.agent_runner.app import build_app as build_runner
from warden.agent_runner.tools import run_tool
from warden.audit_projector.app import build_app as build_projector
from warden.client import WardenClient
from warden.messages import DecisionMade, Envelope, ToolCallCompleted
from warden.policy_gate.app import build_app as build_gate
from warden.scheduler.app import build_app as build_scheduler
from warden.settings import Settings

BUILDERS: dict[str, Callable[[Settings], FastStream]] = {
    "policy_gate": build_gate,
    "scheduler": build_scheduler,
    "agent_runner": build_runner,
    "audit_projector": build_projector,
}


@pytest.fixture
def governed(settings: Settings) -> Settings:
    """Settings for a whole governed stack: a small tenant limit, quick takeover of abandoned runs."""
    return settings.model_copy(
        update={"tenant_concurrency": 3, "runner_ack_wait_seconds": 2.0, "decision_timeout_seconds": 5.0}
    )


async def start_all(run_app: AppRunner, settings: Settings) -> dict[str, FastStream]:
    apps = {name: build(settings) for name, build in BUILDERS.items()}
    for app in apps.values():
        await run_app(app)
    return apps


async def run_row(db: asyncpg.Connection, run_id: str, statuses: tuple[str, ...]) -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        try:
            return await db.fetchrow(
                "SELECT * FROM runs WHERE run_id = $1 AND status = ANY($2)", run_id, list(statuses)
            )
        except asyncpg.UndefinedTableError:
            return None

    return check


async def run_events(nc: NatsClient, settings: Settings, tenant: str, run_id: str) -> list[Envelope[Any]]:
    client = WardenClient(nc, settings.subject_prefix)
    return [event.envelope async for event in client.tail(tenant, run_id, idle_timeout=0.5) if event.envelope]


async def test_allowed_run_completes_with_events_in_order(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """The demo run is allowed, runs its steps, gets one tool call allowed and one denied, and succeeds."""
    await start_all(run_app, governed)
    client = WardenClient(nc, governed.subject_prefix)
    receipt = await client.submit_run(tenant="acme", agent="demo", actor="alice", input={"question": "why?"})
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]

    events = await run_events(nc, governed, "acme", receipt.run_id)
    types = [(e.type, getattr(e.data, "effect", None) or getattr(e.data, "outcome", None)) for e in events]
    assert types == [
        ("decision.made", "allow"),
        ("run.queued", None),
        ("run.dispatched", None),
        ("run.started", None),
        ("step.completed", None),
        ("decision.made", "allow"),
        ("tool_call.completed", "ok"),
        ("decision.made", "deny"),
        ("tool_call.completed", "refused"),
        ("step.completed", None),
        ("run.succeeded", None),
    ]
    completed = [e.data for e in events if isinstance(e.data, ToolCallCompleted)]
    decisions = {e.data.tool_call_id: e.data for e in events if e.type == "decision.made" and e.data.tool_call_id}
    assert all(call.decision_id == decisions[call.tool_call_id].decision_id for call in completed)
    assert len({e.correlation_id for e in events}) == 1, "one correlation id follows the run"

    await eventually(lambda: db.fetchval("SELECT count(*) = 2 FROM tool_calls WHERE outcome IS NOT NULL"))
    rows = await db.fetch("SELECT tool, outcome, decision_id, arguments->>'url' AS url FROM tool_calls ORDER BY step")
    assert [(row["outcome"], row["url"]) for row in rows] == [
        ("ok", "https://example.com/answers"),
        ("refused", "https://evil.example.net/exfiltrate"),
    ]
    assert await db.fetchval("SELECT count(*) FROM decisions WHERE run_id = $1", receipt.run_id) == 3
    assert (run["steps"], run["tool_calls"], run["submitted_by"]) == (2, 2, "alice")
    assert run["policy_revision"].startswith("sha256:")


async def test_denied_run_never_starts(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A principal whose roles do not allow the agent is denied with a reason, and nothing runs."""
    await start_all(run_app, governed)
    client = WardenClient(nc, governed.subject_prefix)
    receipt = await client.submit_run(tenant="acme", agent="demo", actor="bob")
    run = await eventually(await run_row(db, receipt.run_id, ("denied",)), within=30)
    reasons = await db.fetchval("SELECT reasons FROM decisions WHERE run_id = $1", receipt.run_id)
    assert "bob" in reasons
    await asyncio.sleep(1.0)
    events = await run_events(nc, governed, "acme", receipt.run_id)
    assert [e.type for e in events] == ["decision.made"]
    assert run["started_at"] is None


async def test_denied_tool_call_never_executes(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner executes a tool only under an allow: the denied fetch never reaches the tool."""
    executed: list[tuple[str, Any]] = []

    async def recording_run_tool(name: str, arguments: Any) -> Any:
        executed.append((name, dict(arguments)))
        return await run_tool(name, arguments)

    monkeypatch.setattr(execution, "run_tool", recording_run_tool)
    await start_all(run_app, governed)
    receipt = await WardenClient(nc, governed.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
    await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert executed == [("web.fetch", {"url": "https://example.com/answers"})]


async def test_unknown_agent_is_denied(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A submission naming an agent no policy knows is decided: denied, with the reason, and never run."""
    await start_all(run_app, governed)
    client = WardenClient(nc, governed.subject_prefix)
    receipt = await client.submit_run(tenant="acme", agent="nosuchagent", actor="alice")
    run = await eventually(await run_row(db, receipt.run_id, ("denied",)), within=30)
    assert run["agent"] == "nosuchagent"
    events = await run_events(nc, governed, "acme", receipt.run_id)
    assert [event.type for event in events] == ["decision.made"]
    decision = events[0].data
    assert isinstance(decision, DecisionMade)
    assert decision.effect == "deny"
    assert "unknown agent 'nosuchagent'" in decision.reasons[0]
    assert decision.request_seq == receipt.stream_seq


async def test_fifty_runs_never_exceed_the_tenant_limit(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """50 concurrent submissions over two tenants all finish, never more than the limit at once per tenant."""
    await start_all(run_app, governed)
    client = WardenClient(nc, governed.subject_prefix)
    principals = {"acme": "alice", "globex": "gina"}
    receipts = await asyncio.gather(
        *(
            client.submit_run(tenant=tenant, agent="researcher", actor=principals[tenant], input={"topic": f"t{i}"})
            for i in range(25)
            for tenant in principals
        )
    )
    assert len(receipts) == 50

    async def all_finished() -> bool:
        try:
            return bool(await db.fetchval("SELECT count(*) = 50 FROM runs WHERE status = 'succeeded'"))
        except asyncpg.UndefinedTableError:
            return False

    await eventually(all_finished, within=120, interval=0.25)
    # Walk the audit trail in stream order: a slot is taken at dispatch and freed at the finish.
    rows = await db.fetch(
        "SELECT tenant, entity_id, type FROM events WHERE type IN ('run.dispatched', 'run.succeeded', "
        "'run.failed') AND stream LIKE '%EVENTS' ORDER BY stream_seq"
    )
    running: defaultdict[str, set[str]] = defaultdict(set)
    most: defaultdict[str, int] = defaultdict(int)
    for row in rows:
        if row["type"] == "run.dispatched":
            running[row["tenant"]].add(row["entity_id"])
        else:
            running[row["tenant"]].discard(row["entity_id"])
        most[row["tenant"]] = max(most[row["tenant"]], len(running[row["tenant"]]))
    assert dict(most) == {"acme": 3, "globex": 3}, "the limit was reached, and never exceeded"


@pytest.mark.parametrize("service", list(BUILDERS))
async def test_restarting_a_service_mid_run_loses_nothing(
    service: str, governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Stopping any one service while runs are in flight and starting it again: every run still finishes."""
    apps = await start_all(run_app, governed)
    client = WardenClient(nc, governed.subject_prefix)
    receipts = [await client.submit_run(tenant="acme", agent="slow", actor="alice") for _ in range(3)]

    async def started() -> bool:
        events = await run_events(nc, governed, "acme", receipts[0].run_id)
        return any(e.type in {"step.completed", "tool_call.completed"} for e in events)

    await eventually(started, within=30)
    await run_app.stop(apps[service])
    await run_app(BUILDERS[service](governed))
    for receipt in receipts:
        run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=60)
        assert run["status"] == "succeeded", run["error"]
    tool_calls = await db.fetch(
        "SELECT entity_id, payload->>'step' AS step, count(*) FROM events WHERE type = 'tool_call.completed' "
        "GROUP BY 1, 2 HAVING count(*) > 1"
    )
    assert tool_calls == [], "no recorded tool call was executed twice"


async def test_one_run_is_one_trace_across_all_services(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Every event of a run, and its audit rows, carry one trace id, with spans from all four services."""
    await start_all(run_app, governed)
    receipt = await WardenClient(nc, governed.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
    await eventually(await run_row(db, receipt.run_id, ("succeeded",)), within=30)
    await eventually(
        lambda: db.fetchval("SELECT count(*) = 0 FROM events WHERE trace_id IS NULL AND entity_id = $1", receipt.run_id)
    )
    trace_ids = await db.fetch("SELECT DISTINCT trace_id FROM events WHERE entity_id = $1", receipt.run_id)
    assert len(trace_ids) == 1
    trace_id = int(trace_ids[0]["trace_id"], 16)
    assert await db.fetchval("SELECT trace_id FROM runs WHERE run_id = $1", receipt.run_id) == trace_ids[0][0]

    async def services_in_trace() -> set[str]:
        spans = [span for span in SPANS.get_finished_spans() if span.context.trace_id == trace_id]
        return {span.instrumentation_scope.name for span in spans if span.instrumentation_scope}

    expected = {"warden.policy-gate", "warden.scheduler", "warden.agent-runner", "warden.audit-projector"}
    await eventually(lambda: _superset(services_in_trace(), expected))


async def _superset(found: Awaitable[set[str]], expected: set[str]) -> bool:
    return expected <= await found


async def test_gate_fails_closed_on_a_broken_policy(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """A policy that cannot produce a decision yields a recorded deny saying why, and the run never starts."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    (policies / "broken.rego").write_text(
        "package warden.authz\n\nimport rego.v1\n\n# A second, conflicting value makes the decision an error.\n"
        'decision := {"effect": "allow", "reasons": ["conflict"]} if input.action == "run.start"\n'
    )
    await start_all(run_app, governed.model_copy(update={"policy_dir": policies}))
    receipt = await WardenClient(nc, governed.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
    run = await eventually(await run_row(db, receipt.run_id, ("denied",)), within=30)
    reasons = json.loads(run["decision_reasons"])
    assert any("fail closed" in reason for reason in reasons), reasons
    assert run["started_at"] is None


async def test_failing_agent_ends_the_run_as_failed(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """An agent that gives up on a refused tool call ends its run as failed, with the refusal as the reason."""
    agents = tmp_path / "agents"
    shutil.copytree(REPO_ROOT / "agents", agents)
    (agents / "slow.json").write_text(
        json.dumps(
            {
                "name": "slow",
                "on_refusal": "fail",
                "steps": [{"tool_call": {"tool": "web.fetch", "arguments": {"url": "https://example.com/"}}}],
            }
        )
    )
    await start_all(run_app, governed.model_copy(update={"agents_dir": agents}))
    receipt = await WardenClient(nc, governed.subject_prefix).submit_run(tenant="acme", agent="slow", actor="alice")
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "failed"
    assert "web.fetch is not allowed for agent slow" in run["error"]


async def test_cli_runs_lists_runs_and_prints_a_timeline(
    governed: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """`warden runs` lists the tenant's runs, and `--run` prints who asked, each decision and the result."""
    await start_all(run_app, governed)
    receipt = await WardenClient(nc, governed.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
    await eventually(await run_row(db, receipt.run_id, ("succeeded",)), within=30)
    await eventually(lambda: db.fetchval("SELECT count(*) = 14 FROM events WHERE entity_id = $1", receipt.run_id))
    listing = await warden_cli(governed, "runs", "--tenant", "acme")
    assert receipt.run_id in listing
    assert "succeeded" in listing
    timeline = await warden_cli(governed, "runs", "--run", receipt.run_id)
    assert "alice asked for a run of agent demo" in timeline
    assert "DENY tool call" in timeline
    assert "evil.example.net is not in web.fetch's allowed domains" in timeline
    assert "run SUCCEEDED" in timeline
