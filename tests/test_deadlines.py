"""Deadlines and timeouts: a run's deadline (the policy's or its own, the stricter wins) and each tool's timeout."""

import json
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import REPO_ROOT, AppRunner, eventually
from tests.test_governed_run import run_events, run_row, start_all
from warden.agent_runner.limits import DEFAULT_RUN_DEADLINE_SECONDS, TimeLimits
from warden.client import WardenClient
from warden.messages import RunFailed, ToolCallCompleted
from warden.settings import Settings


def limits_in(tmp_path: Path, **changes: Any) -> Path:
    """The shipped policy pack with `changes` merged into `data.warden` (one level deep)."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policy_dir)
    data = json.loads((policy_dir / "data.json").read_text(encoding="utf-8"))
    for section, entries in changes.items():
        for name, value in entries.items():
            current = data["warden"][section].get(name)
            data["warden"][section][name] = {**current, **value} if isinstance(current, dict) else value
    (policy_dir / "data.json").write_text(json.dumps(data), encoding="utf-8")
    return policy_dir


def test_the_stricter_of_the_policys_deadline_and_the_runs_own_wins(tmp_path: Path) -> None:
    """An agent's deadline_seconds beats the default; a shorter timeout_seconds of the run beats both."""
    limits = TimeLimits.from_policy_dir(limits_in(tmp_path, agents={"slow": {"deadline_seconds": 30}}))
    assert limits.run_deadline("demo", None) == (DEFAULT_RUN_DEADLINE_SECONDS, "the policy's deadline for agent demo")
    assert limits.run_deadline("slow", None) == (30.0, "the policy's deadline for agent slow")
    assert limits.run_deadline("slow", 5.0) == (5.0, "the run's own timeout_seconds")
    assert limits.run_deadline("slow", 60.0) == (30.0, "the policy's deadline for agent slow")


def test_a_tool_timeout_comes_from_its_tool_else_the_limits(tmp_path: Path) -> None:
    """tools.<tool>.timeout_seconds, else limits.tool_timeout_seconds; nonsense values fall back to the default."""
    policy_dir = limits_in(
        tmp_path,
        tools={"clock.sleep": {"timeout_seconds": 2}, "math.add": {"timeout_seconds": True}},
        limits={"tool_timeout_seconds": 15},
    )
    limits = TimeLimits.from_policy_dir(policy_dir)
    assert (limits.tool_timeout("clock.sleep"), limits.tool_timeout("math.add"), limits.tool_timeout("x")) == (
        2.0,
        15.0,
        15.0,
    )


async def finished(nc: NatsClient, db: asyncpg.Connection, settings: Settings, **submit: Any) -> tuple[Any, list[Any]]:
    receipt = await WardenClient(nc, settings.subject_prefix).submit_run(tenant="acme", actor="alice", **submit)
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    return run, await run_events(nc, settings, "acme", receipt.run_id)


SLEEPER = {
    "name": "sleeper",
    "steps": [
        {"tool_call": {"tool": "clock.sleep", "arguments": {"seconds": 0.2}}},
        {"tool_call": {"tool": "clock.sleep", "arguments": {"seconds": 5}}},
    ],
}


def with_sleeper(settings: Settings, tmp_path: Path, **policy: Any) -> Settings:
    """Settings whose runner knows `sleeper` (a short sleep, then a long one) and whose policy lets alice run it."""
    agents_dir = tmp_path / "agents"
    agents_dir.mkdir()
    (agents_dir / "sleeper.json").write_text(json.dumps(SLEEPER), encoding="utf-8")
    operator = json.loads((REPO_ROOT / "policies" / "data.json").read_text())["warden"]["roles"]["operator"]
    agents = {"sleeper": {"tools": ["clock.sleep"]}} | policy.pop("agents", {})
    policy_dir = limits_in(
        tmp_path, roles={"operator": {"agents": [*operator["agents"], "sleeper"]}}, agents=agents, **policy
    )
    return settings.model_copy(update={"policy_dir": policy_dir, "agents_dir": agents_dir})


@pytest.mark.parametrize(
    ("agent_policy", "timeout_seconds", "source"),
    [
        ({"deadline_seconds": 2}, None, "the policy's deadline for agent sleeper"),
        ({}, 2, "the run's own timeout_seconds"),
        ({"deadline_seconds": 30}, 2, "the run's own timeout_seconds"),
    ],
    ids=["policy", "submission", "stricter-wins"],
)
async def test_a_run_past_its_deadline_ends_as_deadline_exceeded(
    settings: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
    tmp_path: Path,
    agent_policy: dict[str, Any],
    timeout_seconds: float | None,
    source: str,
) -> None:
    """With a 2 s deadline, `sleeper`'s 5 s sleep is cut at what is left of it and the run ends as
    DeadlineExceeded, saying which deadline it passed."""
    governed = with_sleeper(settings, tmp_path, agents={"sleeper": {"tools": ["clock.sleep"], **agent_policy}})
    await start_all(run_app, governed)
    run, events = await finished(nc, db, governed, agent="sleeper", timeout_seconds=timeout_seconds)
    assert run["status"] == "failed"
    failed = events[-1].data
    assert isinstance(failed, RunFailed)
    assert (failed.error_type, failed.reason) == (
        "DeadlineExceeded",
        f"the run passed its deadline of 2s ({source})",
    )
    completed = [event.data for event in events if isinstance(event.data, ToolCallCompleted)]
    assert [call.outcome for call in completed] == ["ok", "error"]
    assert (completed[1].error or "").startswith("clock.sleep took longer than what was left of the run's deadline")


async def test_a_tool_past_its_timeout_is_an_error_handed_to_the_agent(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """clock.sleep with a 0.2 s timeout: each half-second sleep is cut and recorded as an error, and the run goes on."""
    governed = settings.model_copy(
        update={"policy_dir": limits_in(tmp_path, tools={"clock.sleep": {"timeout_seconds": 0.2}})}
    )
    await start_all(run_app, governed)
    run, events = await finished(nc, db, governed, agent="slow")
    assert run["status"] == "succeeded", run["error"]
    completed = [event.data for event in events if isinstance(event.data, ToolCallCompleted)]
    assert [(call.outcome, call.error) for call in completed] == [
        ("error", "clock.sleep took longer than its timeout of 0.2s"),
        ("error", "clock.sleep took longer than its timeout of 0.2s"),
    ]


def test_retries_come_from_the_tool_and_are_capped(tmp_path: Path) -> None:
    """tools.<tool>.retries (at most 10); a tool without a whole number of retries is never tried again."""
    policy_dir = limits_in(
        tmp_path, tools={"web.fetch": {"retries": 3}, "math.add": {"retries": 50}, "text.echo": {"retries": "2"}}
    )
    limits = TimeLimits.from_policy_dir(policy_dir)
    assert [limits.retries(tool) for tool in ("web.fetch", "math.add", "text.echo", "clock.sleep")] == [3, 10, 0, 0]
