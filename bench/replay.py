"""Replay throughput: rebuild the projections from N stored events, beside a raw read of the same stream.

    uv run python -m bench.replay [--events 200000]

Starts embedded NATS (fsync always) and Postgres in a temporary directory unless WARDEN_NATS_URL and
WARDEN_DATABASE_URL are set, fills a private stream, then measures in one run: (1) the floor, a
raw batched pull of every message with no processing; (2) `warden audit replay` into a fresh
schema. Prints both rates and their ratio and writes bench/results/replay.json.
"""

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.audit_projector.replay import replay
from shared.bus import envelope_headers
from shared.messages import Envelope, RunStarted, RunSubmitted, StepCompleted, make_envelope
from shared.settings import Settings
from shared.streams import StreamNames, provision
from shared.subjects import Subjects

RESULTS = Path(__file__).parent / "results"


async def fill(settings: Settings, count: int) -> None:
    """Publish `count` events (a run's submission, start and steps), pipelined 1,000 at a time."""
    subjects = Subjects(settings.subject_prefix)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await provision(js, subjects)
    sent, run = 0, 0
    while sent < count:
        run += 1
        cause = make_envelope(RunSubmitted(agent="bench"), tenant="acme", subject=f"run-{run}", actor="a", source="b")
        started = make_envelope(
            RunStarted(decision_id="d", worker="w"),
            tenant="acme",
            subject=f"run-{run}",
            actor="runner",
            source="b",
            caused_by=cause,
        )
        batch: list[Envelope[Any]] = [cause, started]
        batch += [
            make_envelope(
                StepCompleted(step=i, kind="model_turn"),
                tenant="acme",
                subject=f"run-{run}",
                actor="runner",
                source="b",
                caused_by=cause,
            )
            for i in range(98)
        ]
        futures = [
            await js.publish_async(subjects.expected_subject(e), e.to_bytes(), headers=envelope_headers(e))
            for e in batch[: count - sent]
        ]
        await asyncio.gather(*futures)
        sent += len(futures)
    await nc.close()


async def raw_read(settings: Settings) -> tuple[int, float]:
    """The floor: fetch every message of both audited streams in large batches, doing nothing with them."""
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    names = StreamNames.for_prefix(settings.subject_prefix)
    total, started = 0, time.perf_counter()
    for stream in names.audited:
        last = (await js.stream_info(stream)).state.last_seq
        if not last:
            continue
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE)
        subscription = await js.pull_subscribe("", stream=stream, config=config)
        seen = 0
        while seen < last:
            messages = await subscription.fetch(5000, timeout=5)
            total += len(messages)
            seen = messages[-1].metadata.sequence.stream
        await subscription.unsubscribe()
    seconds = time.perf_counter() - started
    await nc.close()
    return total, seconds


async def main(events: int) -> None:
    token = uuid.uuid4().hex[:8]
    external = os.environ.get("WARDEN_NATS_URL") and os.environ.get("WARDEN_DATABASE_URL")
    embedded = None
    if external:
        nats_url, admin_url = os.environ["WARDEN_NATS_URL"], os.environ["WARDEN_DATABASE_URL"]
    else:
        from warden.embedded import EmbeddedServers  # noqa: PLC0415

        embedded = EmbeddedServers(Path(tempfile.mkdtemp(prefix="warden-bench-")))
        endpoints = await embedded.start()
        nats_url, admin_url = endpoints.nats_url, endpoints.database_url
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f"CREATE DATABASE bench_{token}")
    database_url = admin_url.rsplit("/", 1)[0] + f"/bench_{token}"
    settings = Settings(nats_url=nats_url, database_url=database_url, subject_prefix=f"bench{token}")
    try:
        fill_started = time.perf_counter()
        await fill(settings, events)
        print(f"stored {events} events in {time.perf_counter() - fill_started:.1f}s")
        raw_count, raw_seconds = await raw_read(settings)
        report = await replay(settings, "replayed")
        result = {
            "events": events,
            "raw_read_events_per_second": round(raw_count / raw_seconds),
            "replay_events_per_second": round(report.events_per_second),
            "replay_seconds": round(report.seconds, 3),
            "replay_to_floor_ratio": round(report.events_per_second / (raw_count / raw_seconds), 3),
            "servers": "external" if external else "embedded (fsync always)",
        }
    finally:
        nc = await nats.connect(nats_url)
        for stream in vars(StreamNames.for_prefix(settings.subject_prefix)).values():
            await nc.jetstream().delete_stream(stream)
        await nc.close()
        await admin.execute(f"DROP DATABASE bench_{token} WITH (FORCE)")
        await admin.close()
        if embedded:
            await embedded.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replay.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    asyncio.run(main(parser.parse_args().events))
