"""How long the scheduler takes to start, against the length of the history behind it.

    uv run --group bench python -m bench.scheduler_restart [--runs 1000 5000 20000]

For each size, on embedded NATS (fsync always): that many finished runs are written to a fresh
events stream (a decision, run.queued, run.dispatched and run.succeeded each, beside 10
step.completed events the fold skips), plus 20 runs still in play. The scheduler then starts twice:
once folding from sequence 1 (no watermark yet, as the first start of an installation), once from
the watermark the first start wrote. Each start is timed until the state is rebuilt, and the events
each folded are counted. Writes bench/results/scheduler_restart.json.
"""

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker

from bench.common import REPO_ROOT, BenchServers, Installation, admin_connect
from warden.bus import envelope_headers
from warden.messages import (
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunQueued,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    make_envelope,
)
from warden.scheduler.app import WATERMARK_KEY, Scheduler
from warden.streams import StreamNames
from warden.subjects import Subjects

RESULTS = REPO_ROOT / "bench" / "results" / "scheduler_restart.json"


def history(run: int, finished: bool) -> list[Envelope[Any]]:
    run_id = f"run-{run}"
    submitted = make_envelope(RunSubmitted(agent="demo"), tenant="acme", entity_id=run_id, actor="alice", source="b")
    decision = DecisionMade(
        decision_id=f"d{run}",
        request_type=RunSubmitted.TYPE,
        request_id=submitted.id,
        request_seq=1,
        effect="allow",
        policy_revision="p",
        evaluation_ms=0.1,
    )
    payloads: list[Payload] = [decision, RunQueued(decision_id=f"d{run}", priority=5, agent="demo", request_seq=1)]
    payloads.append(RunDispatched(decision_id=f"d{run}", agent="demo", request_seq=1))
    payloads += [StepCompleted(step=step, kind="model_turn") for step in range(10)]
    if finished:
        payloads.append(RunSucceeded(steps=10, tool_calls=0))
    return [
        make_envelope(p, tenant="acme", entity_id=run_id, actor="s", source="b", caused_by=submitted) for p in payloads
    ]


async def fill(nats_url: str, prefix: str, runs: int) -> int:
    subjects = Subjects(prefix)
    nc = await admin_connect(nats_url)
    js = nc.jetstream()
    pending = []
    for run in range(runs + 20):
        for envelope in history(run, finished=run < runs):
            pending.append(
                await js.publish_async(
                    subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope)
                )
            )
        if len(pending) > 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    stored = (await js.stream_info(StreamNames.for_prefix(prefix).events)).state.last_seq
    await nc.close()
    return stored


async def start(install: Installation, broker: NatsBroker) -> tuple[float, int]:
    """Seconds until the scheduler's state is rebuilt, and how many events it folded."""
    scheduler = Scheduler(install.settings.model_copy(update={"tenant_concurrency": 1000}), broker)
    started = time.perf_counter()
    task = asyncio.create_task(scheduler.serve())
    while not scheduler.caught_up:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    seconds = time.perf_counter() - started
    await asyncio.sleep(WATERMARK_SECONDS)
    await scheduler.keep_watermark(
        await broker.connection.jetstream().key_value(StreamNames.for_prefix(install.settings.subject_prefix).scheduler)
    )
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return seconds, scheduler.folded


WATERMARK_SECONDS = 1.1  # past WATERMARK_EVERY_SECONDS, so the watermark is written


async def measure(nats_url: str, admin_url: str, runs: int) -> dict[str, Any]:
    install = await Installation.create(nats_url, admin_url)
    events = await fill(nats_url, install.settings.subject_prefix, runs)
    broker = NatsBroker(nats_url)
    await broker.connect()
    try:
        kv = await broker.connection.jetstream().key_value(
            StreamNames.for_prefix(install.settings.subject_prefix).scheduler
        )
        with_no_watermark = await start(install, broker)
        assert (await kv.get(WATERMARK_KEY)).value
        from_watermark = await start(install, broker)
    finally:
        await broker.stop()
    return {
        "events_in_stream": events,
        "from_sequence_1": {"seconds": round(with_no_watermark[0], 3), "folded": with_no_watermark[1]},
        "from_watermark": {"seconds": round(from_watermark[0], 3), "folded": from_watermark[1]},
    }


async def main(sizes: list[int]) -> None:
    servers = BenchServers(Path(tempfile.mkdtemp(prefix="warden-bench-")), sync="always")
    endpoints = await servers.start()
    try:
        results = {
            str(runs): await measure(endpoints.nats_url, servers.admin_database_url("postgres"), runs) for runs in sizes
        }
    finally:
        await servers.stop()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for runs, result in results.items():
        cold, warm = result["from_sequence_1"], result["from_watermark"]
        print(
            f"{runs:>6} finished runs ({result['events_in_stream']:,} events): "
            f"from sequence 1 {cold['seconds']} s ({cold['folded']:,} folded), "
            f"from the watermark {warm['seconds']} s ({warm['folded']:,} folded)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 5000, 20000])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs))
