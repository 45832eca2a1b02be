"""Halts: how soon after a halt is stored the calls in its scope stop starting, and its runs end, under load.

    uv run --group bench python -m bench.halts [--repetitions 50] [--runs 16]
    uv run --group bench python -m bench.run --only halts --name halts

Each repetition starts `runs` runs of a scripted agent that calls a tool every 50 ms in tenant
`acme`, and half as many in tenant `globex` (load outside the halt's scope), waits until every
`acme` run is calling, then halts `acme` through the client and waits for every `acme` run to end
`cancelled`. All times are JetStream's own stamps on the stored messages (one server, one clock):

- `last_call_after_ms`: from the halt's decision being stored to the last `tool_call.requested`
  of a run in its scope being stored (negative: none was stored after the decision). The promise
  is under 1,000 ms.
- `all_ended_after_ms`: from the same moment to the last of those runs' `run.cancelled`.

Then the halt is lifted, the `globex` runs are cancelled, and the next repetition begins. The
services run as separate processes (gate, scheduler, runner), as in production.
Writes bench/results/halts_only.json (`bench.run --only halts --name halts` writes halts.json, .md, .png).
"""

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from bench.common import REPO_ROOT, BenchServers, Installation, ServiceProcesses, admin_connect, percentile
from warden.client import WardenClient
from warden.consumers import ordered_subscription
from warden.errors import InvalidMessage
from warden.messages import DecisionMade, HaltRequested, RunCancelled, ToolCallRequested, parse_envelope
from warden.streams import StreamNames
from warden.subjects import Subjects

RESULTS = REPO_ROOT / "bench" / "results" / "halts_only.json"
AGENT = {
    "name": "busy",
    "description": "Calls clock.sleep for 50 ms, ninety times: a run that is always about to start a call.",
    "on_refusal": "fail",
    "steps": [{"tool_call": {"tool": "clock.sleep", "arguments": {"seconds": 0.05}}}] * 90,
    "output": None,
}


class Clock:
    """What the server stored, by run: its last call request and its end, and each decision's time."""

    def __init__(self) -> None:
        self.last_call: dict[str, datetime] = {}
        self.calls: dict[str, int] = {}
        self.cancelled: dict[str, datetime] = {}
        self.decided: dict[str, datetime] = {}

    async def on_message(self, message: Msg) -> None:
        try:
            envelope = parse_envelope(message.data)
        except InvalidMessage:
            return
        stored = message.metadata.timestamp
        data = envelope.data
        if isinstance(data, ToolCallRequested):
            self.last_call[envelope.entity_id] = stored
            self.calls[envelope.entity_id] = self.calls.get(envelope.entity_id, 0) + 1
        elif isinstance(data, RunCancelled):
            self.cancelled[envelope.entity_id] = stored
        elif isinstance(data, DecisionMade):
            self.decided[data.decision_id] = stored


def policies_and_agents(directory: Path) -> tuple[Path, Path]:
    policy_dir, agents_dir = directory / "policies", directory / "agents"
    shutil.copytree(REPO_ROOT / "policies", policy_dir)
    data = json.loads((policy_dir / "data.json").read_text(encoding="utf-8"))
    data["warden"]["agents"]["busy"] = {"tools": ["clock.sleep"], "max_tool_calls": 100}
    data["warden"]["roles"]["operator"]["agents"].append("busy")
    (policy_dir / "data.json").write_text(json.dumps(data), encoding="utf-8")
    agents_dir.mkdir()
    (agents_dir / "busy.json").write_text(json.dumps(AGENT), encoding="utf-8")
    return policy_dir, agents_dir


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {within}s")
        await asyncio.sleep(0.01)


async def run_halts(nats_url: str, admin_url: str, *, repetitions: int, runs: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="warden-bench-halts-"))
    policy_dir, agents_dir = policies_and_agents(work)
    install = await Installation.create(nats_url, admin_url, tenant_concurrency=runs * 2, runner_concurrency=runs * 2)
    settings = install.settings
    services = ServiceProcesses(
        settings, extra_env={"WARDEN_AGENTS_DIR": str(agents_dir), "WARDEN_POLICY_DIR": str(policy_dir)}
    )
    await services.start("policy_gate", "scheduler", "agent_runner")
    nc = await admin_connect(nats_url)
    subjects, streams = Subjects(settings.subject_prefix), StreamNames.for_prefix(settings.subject_prefix)
    clock = Clock()
    js = nc.jetstream()
    watches = [
        await ordered_subscription(
            js,
            [f"{subjects.prefix}.cmd.*.*.{ToolCallRequested.TYPE}"],
            streams.commands,
            clock.on_message,
            deliver_policy=DeliverPolicy.NEW,
        ),
        await ordered_subscription(
            js,
            [subjects.events_of_type(RunCancelled), subjects.tenant_decisions_on("acme", HaltRequested)],
            streams.events,
            clock.on_message,
            deliver_policy=DeliverPolicy.NEW,
        ),
    ]
    client = WardenClient(nc, settings.subject_prefix)
    last_call_after, all_ended_after, calls_in_flight = [], [], []
    try:
        for _ in range(repetitions):
            acme = [(await client.submit_run(tenant="acme", agent="busy", actor="alice")).run_id for _ in range(runs)]
            globex = [
                (await client.submit_run(tenant="globex", agent="busy", actor="gina")).run_id
                for _ in range(max(runs // 2, 1))
            ]
            await until(lambda acme=acme: all(clock.calls.get(run, 0) >= 3 for run in acme), 60, "every run calling")
            halt = await client.halt(tenant="acme", actor="alice", reason="bench")
            if not halt.in_force or halt.decision_id is None:
                raise RuntimeError(f"the halt was not allowed: {halt.reasons}")
            await until(lambda acme=acme: all(run in clock.cancelled for run in acme), 30, "every run cancelled")
            await until(lambda decided=halt.decision_id: decided in clock.decided, 10, "the halt's decision")
            halted_at = clock.decided[halt.decision_id]
            last_call_after.append((max(clock.last_call[run] for run in acme) - halted_at).total_seconds() * 1000)
            all_ended_after.append((max(clock.cancelled[run] for run in acme) - halted_at).total_seconds() * 1000)
            calls_in_flight.append(sum(clock.calls.get(run, 0) for run in acme))
            await client.lift_halt(tenant="acme", actor="alice")
            for run_id in globex:
                await client.cancel_run(tenant="globex", run_id=run_id, actor="gina", wait_seconds=10)
            await until(lambda globex=globex: all(run in clock.cancelled for run in globex), 30, "globex cancelled")
    finally:
        for watch in watches:
            await watch.unsubscribe()
        await nc.close()
        await services.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "repetitions": repetitions,
        "runs_in_scope": runs,
        "runs_out_of_scope": max(runs // 2, 1),
        "tool_call_every_ms": 50,
        "last_call_after_ms": _summary(last_call_after),
        "all_ended_after_ms": _summary(all_ended_after),
        "within_one_second": sum(value < 1000 for value in last_call_after),
        "raw": {"last_call_after_ms": _rounded(last_call_after), "all_ended_after_ms": _rounded(all_ended_after)},
    }


def _rounded(values: list[float]) -> list[float]:
    return [round(value, 2) for value in values]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "max": round(max(values), 2),
    }


async def main_async(repetitions: int, runs: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="warden-bench-halts-state-"))
    servers = BenchServers(state, sync="always")
    endpoints = await servers.start()
    try:
        return await run_halts(
            endpoints.nats_url, servers.admin_database_url("postgres"), repetitions=repetitions, runs=runs
        )
    finally:
        await servers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=50)
    parser.add_argument("--runs", type=int, default=16, help="runs in the halt's scope per repetition")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.repetitions, args.runs))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: value for key, value in results.items() if key != "raw"}, indent=2))


if __name__ == "__main__":
    main()
