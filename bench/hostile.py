"""Hostile flood: N hostile commands among valid runs, beside N benign commands, on the whole stack.

    uv run --group bench python -m bench.hostile [--hostile 10000] [--runs 200]

Starts embedded NATS (fsync always) and Postgres in a temporary directory unless WARDEN_NATS_URL
and WARDEN_DATABASE_URL are set, then runs two passes, each on a fresh installation with the four
services as their own processes:

1. benign: N run submissions the gate answers the cheapest valid way (an agent the policy data does
   not know: decided, denied, nothing runs), published beside `runs` valid governed runs;
2. hostile: N hostile commands drawn from the test suite's Hypothesis strategy (deep nesting, huge
   and unsafe numbers, NaN, NUL, invalid UTF-8, lying headers, extra subject tokens, other tenants,
   squatted idempotency keys, bodies up to 900 KB), beside the same valid runs.

For each pass it reports how long the stack took to drain (every command answered and projected,
every run succeeded, both projections caught up), and for the hostile pass the rejections by code
and whether every service is still the process it started as. The ratio of the two drain times is
what hostile input costs beyond valid input. Writes bench/results/hostile.json.
"""

import argparse
import asyncio
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from hypothesis.errors import NonInteractiveExampleWarning
from nats.aio.client import Client as NatsClient

from bench.common import REPO_ROOT, Installation, ServiceProcesses, admin_connect, embedded
from tests.strategies import HostileCommand, hostile_commands
from warden.bus import envelope_headers
from warden.client import WardenClient
from warden.database import DatabaseRole
from warden.messages import RunSubmitted, make_envelope
from warden.streams import StreamNames
from warden.subjects import Subjects

SERVICES = ("audit_projector", "policy_gate", "scheduler", "agent_runner")
IN_FLIGHT = 256
RESULTS = REPO_ROOT / "bench" / "results" / "hostile.json"


def draw_hostile(prefix: str, count: int) -> list[HostileCommand]:
    strategy = hostile_commands(prefix)
    with warnings.catch_warnings():
        # Drawing outside a test is what this benchmark is for: a large, varied, repeatable-in-kind load.
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        return [strategy.example() for _ in range(count)]


def benign(prefix: str, count: int) -> list[HostileCommand]:
    subjects = Subjects(prefix)
    commands = []
    for index in range(count):
        envelope = make_envelope(
            RunSubmitted(agent="nosuchagent"), tenant="acme", entity_id=f"benign-{index}", actor="alice", source="bench"
        )
        body, headers = envelope.to_bytes(), envelope_headers(envelope)
        commands.append(HostileCommand("benign", subjects.expected_subject(envelope), body, headers))
    return commands


async def publish_all(nc: NatsClient, commands: list[HostileCommand]) -> list[tuple[HostileCommand, int]]:
    """Publish every command, IN_FLIGHT at a time; the ones JetStream stored, with their sequences."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(command: HostileCommand) -> tuple[HostileCommand, int | None]:
        async with slots:
            ack = await nc.jetstream().publish(command.subject, command.body, headers=command.headers)
            return command, None if ack.duplicate else ack.seq

    return [(command, seq) for command, seq in await asyncio.gather(*map(one, commands)) if seq is not None]


async def wait_for(check: Callable[[], Awaitable[bool]]) -> None:
    # Polling: what is waited for lives in other processes' Postgres rows, no event to wait on.
    while not await check():  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def run_pass(
    nats_url: str, admin_url: str, commands_for: Callable[[str], list[HostileCommand]], runs: int
) -> dict[str, Any]:
    install = await Installation.create(nats_url, admin_url)
    settings = install.settings
    commands = commands_for(settings.subject_prefix)
    services = ServiceProcesses(settings)
    await services.start(*SERVICES)
    nc = await admin_connect(nats_url)
    db = await asyncpg.connect(settings.database_url_for(DatabaseRole.READER))
    client = WardenClient(nc, settings.subject_prefix)
    try:
        # Warm-up: one run through every service, so start-up is not in the measurement.
        warm = await client.submit_run(tenant="acme", agent="researcher", actor="alice")
        await wait_for(lambda: _run_succeeded(db, warm.run_id))
        pids = {label: process.pid for label, process in services.processes.items()}

        started = time.perf_counter()
        stored, receipts = await asyncio.gather(
            publish_all(nc, commands),
            asyncio.gather(
                *(
                    client.submit_run(tenant=tenant, agent="researcher", actor=actor, input={"topic": f"t{index}"})
                    for index in range(runs)
                    for tenant, actor in [("acme", "alice") if index % 2 else ("globex", "gina")]
                )
            ),
        )
        published = time.perf_counter() - started
        seqs = [seq for _, seq in stored]
        run_ids = [receipt.run_id for receipt in receipts]
        await wait_for(lambda: _answered(db, seqs))
        await wait_for(lambda: _runs_succeeded(db, run_ids))
        await wait_for(lambda: _caught_up(nc, db, settings.subject_prefix))
        drained = time.perf_counter() - started

        codes = Counter(
            row["code"]
            for row in await db.fetch("SELECT code FROM rejected_commands WHERE command_stream_seq = ANY($1)", seqs)
        )
        alive = {
            label: process.returncode is None and process.pid == pids[label]
            for label, process in services.processes.items()
        }
        return {
            "commands": len(commands),
            "stored": len(stored),
            "bytes": sum(len(command.body) for command in commands),
            "valid_runs": runs,
            "publish_seconds": round(published, 2),
            "drain_seconds": round(drained, 2),
            "rejections_by_code": dict(codes.most_common()),
            "services_never_exited": all(alive.values()),
        }
    finally:
        await db.close()
        await nc.close()
        await services.stop()


async def _run_succeeded(db: asyncpg.Connection, run_id: str) -> bool:
    try:
        return bool(await db.fetchval("SELECT count(*) FROM runs WHERE run_id = $1 AND status = 'succeeded'", run_id))
    except asyncpg.UndefinedTableError:
        return False


async def _answered(db: asyncpg.Connection, seqs: list[int]) -> bool:
    """Every command has its answer projected: a rejection, or a decision."""
    answered = await db.fetchval(
        "SELECT (SELECT count(*) FROM rejected_commands WHERE command_stream_seq = ANY($1)) + "
        "(SELECT count(*) FROM decisions WHERE request_seq = ANY($1))",
        seqs,
    )
    return bool(answered >= len(seqs))


async def _runs_succeeded(db: asyncpg.Connection, run_ids: list[str]) -> bool:
    query = "SELECT count(*) FROM runs WHERE run_id = ANY($1) AND status = 'succeeded'"
    return bool(await db.fetchval(query, run_ids) == len(run_ids))


async def _caught_up(nc: NatsClient, db: asyncpg.Connection, prefix: str) -> bool:
    names = StreamNames.for_prefix(prefix)
    stored = sum([(await nc.jetstream().stream_info(name)).state.last_seq for name in names.audited])
    return bool(await db.fetchval("SELECT coalesce(sum(last_seq), 0) = $1 FROM projector_positions", stored))


async def run_hostile(nats_url: str, admin_url: str, count: int, runs: int) -> dict[str, Any]:
    baseline = await run_pass(nats_url, admin_url, lambda prefix: benign(prefix, count), runs)
    hostile = await run_pass(nats_url, admin_url, lambda prefix: draw_hostile(prefix, count), runs)
    return {
        "benign": baseline,
        "hostile": hostile,
        "hostile_to_benign_drain": round(hostile["drain_seconds"] / baseline["drain_seconds"], 2),
    }


async def main(count: int, runs: int) -> None:
    nats_url, database_url = os.environ.get("WARDEN_NATS_URL"), os.environ.get("WARDEN_DATABASE_URL")
    if nats_url and database_url:
        result = await run_hostile(nats_url, database_url, count, runs)
    else:
        async with embedded("always") as (nats_url, admin_url):
            result = await run_hostile(nats_url, admin_url, count, runs)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("benign", "hostile"):
        one = result[name]
        print(
            f"{name:>8}: {one['stored']:,} commands ({one['bytes'] / 2**20:.0f} MiB) and {one['valid_runs']} runs "
            f"drained in {one['drain_seconds']} s; services never exited: {one['services_never_exited']}"
        )
    print(f"hostile / benign drain time: {result['hostile_to_benign_drain']}")
    print(f"rejections: {result['hostile']['rejections_by_code']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=10_000, help="hostile (and benign) commands per pass")
    parser.add_argument("--runs", type=int, default=200, help="valid governed runs published during each pass")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.hostile, arguments.runs))
