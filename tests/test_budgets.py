"""Budgets that hold under concurrency: every call reserves its estimate in the ledger before it starts and
settles what it used after, by compare-and-set, so many runners at once never overdraw a budget."""

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client as NatsClient

from tests.conftest import REPO_ROOT, AppRunner, eventually
from tests.test_governed_run import run_events, start_all
from warden.agent_runner.budgets import (
    NANOS_PER_USD,
    Amount,
    Balance,
    Budget,
    Budgets,
    Ledger,
    Limits,
    model_call_estimate,
)
from warden.agent_runner.model_client import ModelPrices
from warden.client import WardenClient
from warden.messages import RunFailed, ToolCallCompleted, ToolCallRequested
from warden.offline_model import OfflineModelServer
from warden.settings import Settings
from warden.streams import StreamNames

ONE_CALL_AGENT = {
    "name": "one-call",
    "description": "One tool call, so each run spends exactly one call of a budget.",
    "on_refusal": "fail",
    "steps": [{"tool_call": {"tool": "math.add", "arguments": {"a": 1, "b": 2}}}],
    "output": "added",
}


def test_limits_say_which_dimension_would_go_over() -> None:
    limits = Limits.from_policy({"tokens": 100, "cost_usd": 0.5, "tool_calls": 2})
    assert limits.overdrawn(Amount(tokens=100, cost_nanousd=500_000_000, tool_calls=2)) is None
    assert limits.overdrawn(Amount(tokens=101)) == "101 tokens of 100"
    assert limits.overdrawn(Amount(cost_nanousd=500_000_001)) == "0.500000 USD of 0.500000"
    assert limits.overdrawn(Amount(tool_calls=3)) == "3 tool calls of 2"
    assert Limits.from_policy({"tokens": "lots", "cost_usd": True}).unlimited


def test_budgets_come_from_the_policy_data() -> None:
    budgets = Budgets.from_policy_data(
        {
            "budgets": {"tenants": {"acme": {"tool_calls": 5}}, "agents": {"assistant": {"tokens": 9}}},
            "tools": {"web.fetch": {"cost_usd": 0.25}, "math.add": {}},
        }
    )
    assert [budget.key for budget in budgets.shared("acme", "assistant")] == ["tenant.acme", "agent.acme.assistant"]
    assert [budget.key for budget in budgets.shared("globex", "demo")] == []
    assert budgets.tool_call("web.fetch") == Amount(tool_calls=1, cost_nanousd=NANOS_PER_USD // 4)
    assert budgets.tool_call("math.add") == Amount(tool_calls=1)


def test_a_model_call_reserves_its_output_cap_and_an_estimate_of_its_input() -> None:
    prices = ModelPrices.from_policy_data(json.loads((REPO_ROOT / "policies" / "data.json").read_text())["warden"])
    messages = [{"role": "user", "content": "x" * 400}]
    estimate = model_call_estimate(prices, "warden-test-model", messages, 256)
    assert 256 + 100 <= estimate.tokens <= 256 + 130
    assert estimate.cost_nanousd > 0
    assert Balance.from_bytes(Balance(Amount(1, 2, 3), {"c": Amount(4, 5, 6)}).to_bytes()).committed() == Amount(
        5, 7, 9
    )


async def test_the_ledger_admits_exactly_what_fits_when_two_hundred_calls_race(
    settings: Settings, nc: NatsClient
) -> None:
    """200 concurrent reservations of one tool call each against a budget of 37: 37 are held, the rest
    refused; holding again for a call changes nothing; settling (twice) leaves the ledger exact."""
    ledger = Ledger(nc.jetstream(), StreamNames.for_prefix(settings.subject_prefix).ledger)
    budget = Budget("tenant.acme", "tenant acme's budget", Limits(tool_calls=37))
    one = Amount(tool_calls=1, cost_nanousd=3)
    refusals = await asyncio.gather(*(ledger.reserve(budget, f"call-{i}", one) for i in range(200)))
    admitted = [f"call-{i}" for i, refusal in enumerate(refusals) if refusal is None]
    assert len(admitted) == 37
    assert {refusal for refusal in refusals if refusal} == {"tenant acme's budget would reach 38 tool calls of 37"}
    assert await ledger.reserve(budget, admitted[0], one) is None  # already held: no second hold
    balance, _ = await ledger.balance(budget.key)
    assert balance.committed() == Amount(tool_calls=37, cost_nanousd=111)
    await asyncio.gather(*(ledger.settle(budget, call, one) for call in [*admitted, *admitted]))
    balance, _ = await ledger.balance(budget.key)
    assert (balance.spent, balance.held) == (Amount(tool_calls=37, cost_nanousd=111), {})


def budgeted_policies(tmp_path: Path, budgets: dict[str, Any], **tools: dict[str, Any]) -> tuple[Path, Path]:
    """The shipped pack with `budgets`, the `one-call` agent (which alice may run) and `tools` merged in."""
    policy_dir, agents_dir = tmp_path / "policies", tmp_path / "agents"
    shutil.copytree(REPO_ROOT / "policies", policy_dir)
    shutil.copytree(REPO_ROOT / "agents", agents_dir)
    (agents_dir / "one-call.json").write_text(json.dumps(ONE_CALL_AGENT), encoding="utf-8")
    data = json.loads((policy_dir / "data.json").read_text(encoding="utf-8"))
    warden = data["warden"]
    warden["budgets"] = budgets
    warden["agents"]["one-call"] = {"tools": ["math.add"], "max_tool_calls": 1}
    warden["roles"]["operator"]["agents"].append("one-call")
    for name, spec in tools.items():
        warden["tools"][name] |= spec
    (policy_dir / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return policy_dir, agents_dir


async def finished(db: asyncpg.Connection, run_ids: list[str]) -> list[Any]:
    rows = await db.fetch(
        "SELECT run_id, status, error FROM runs WHERE run_id = ANY($1) AND status IN ('succeeded', 'failed')", run_ids
    )
    return rows if len(rows) == len(run_ids) else []


async def test_two_hundred_concurrent_runs_against_a_tenant_budget_admit_exactly_what_it_allows(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """acme may spend 40 tool calls at 0.01 USD each. 200 runs of one call each, 64 at a time: 40 succeed,
    160 end as BudgetExceeded on the record, and the ledger holds exactly 40 calls and 0.40 USD, nothing held."""
    admitted = 40
    policy_dir, agents_dir = budgeted_policies(
        tmp_path, {"tenants": {"acme": {"tool_calls": admitted, "cost_usd": 1.0}}}, **{"math.add": {"cost_usd": 0.01}}
    )
    wide = settings.model_copy(
        update={
            "policy_dir": policy_dir,
            "agents_dir": agents_dir,
            "tenant_concurrency": 64,
            "runner_concurrency": 64,
        }
    )
    await start_all(run_app, wide)
    client = WardenClient(nc, settings.subject_prefix)
    receipts = await asyncio.gather(
        *(client.submit_run(tenant="acme", agent="one-call", actor="alice") for _ in range(200))
    )
    run_ids = [receipt.run_id for receipt in receipts]
    rows = await eventually(lambda: finished(db, run_ids), within=180, interval=0.5)
    statuses = [row["status"] for row in rows]
    assert statuses.count("succeeded") == admitted
    refused = [row["error"] for row in rows if row["status"] == "failed"]
    assert len(refused) == 200 - admitted
    assert all(error.startswith("budget exceeded: tenant acme's budget would reach") for error in refused), refused[:3]

    ledger = Ledger(nc.jetstream(), StreamNames.for_prefix(settings.subject_prefix).ledger)
    balance, _ = await ledger.balance("tenant.acme")
    assert balance.spent == Amount(tool_calls=admitted, cost_nanousd=admitted * NANOS_PER_USD // 100)
    assert balance.held == {}

    # On the record: a refused call names the budget, and its run ends as BudgetExceeded.
    events = await run_events(nc, settings, "acme", next(row["run_id"] for row in rows if row["status"] == "failed"))
    [call] = [event.data for event in events if isinstance(event.data, ToolCallCompleted)]
    assert (call.outcome, (call.error or "").startswith("budget exceeded: ")) == ("refused", True)
    [failed] = [event.data for event in events if isinstance(event.data, RunFailed)]
    assert failed.error_type == "BudgetExceeded"
    # The policy sees what the tenant has spent (and holds) of its budget when it decides a call.
    payload = await eventually(
        lambda: db.fetchval("SELECT payload FROM events WHERE type = 'tool_call.requested' LIMIT 1"), within=10
    )
    request = ToolCallRequested.model_validate_json(payload)
    assert request.tenant_usage is not None
    assert 0 <= request.tenant_usage.tool_calls <= admitted


async def test_a_model_call_over_its_agents_budget_does_not_start(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """The assistant may spend 100 tokens in acme: its first model call reserves more (its 256-token output
    cap alone), so it is not made and the run ends as BudgetExceeded; nothing stays held."""
    async with OfflineModelServer(models=("warden-test-model",)) as model_server:
        policy_dir, agents_dir = budgeted_policies(tmp_path, {"agents": {"assistant": {"tokens": 100}}})
        assistant = json.loads((agents_dir / "assistant.json").read_text())
        assistant["endpoint"] = {"base_url": model_server.base_url, "timeout_seconds": 5.0}
        assistant["max_output_tokens"] = 256
        (agents_dir / "assistant.json").write_text(json.dumps(assistant), encoding="utf-8")
        await start_all(run_app, settings.model_copy(update={"policy_dir": policy_dir, "agents_dir": agents_dir}))
        client = WardenClient(nc, settings.subject_prefix)
        receipt = await client.submit_run(tenant="acme", agent="assistant", actor="alice", input={"prompt": "hi"})
        rows = await eventually(lambda: finished(db, [receipt.run_id]), within=30)
        assert rows[0]["status"] == "failed"
        assert rows[0]["error"].startswith("budget exceeded: agent assistant's budget in tenant acme would reach")
        assert model_server.requests == 0
    ledger = Ledger(nc.jetstream(), StreamNames.for_prefix(settings.subject_prefix).ledger)
    balance, revision = await ledger.balance("agent.acme.assistant")
    assert (balance.spent, balance.held, revision) == (Amount(), {}, None)
