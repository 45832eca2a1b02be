"""W4, audit replay: rebuild the projections from N stored events, beside the two floors it sits on.

    uv run python -m bench.replay [--events 1000000] [--mix steps|governed]

Starts embedded NATS (fsync always) and Postgres in a temporary directory unless WARDEN_NATS_URL
and WARDEN_DATABASE_URL are set, fills a private pair of audited streams, then measures in one run:

1. raw read: every message of both streams through the replay's own bare reader
   (`replay.read_range`: an unacknowledged pull consumer read over a bare NATS connection, each
   message parsed into subject, sequence, timestamp, headers and data, nothing else). nats-py's
   ordered push consumer with a callback, the fastest way through nats-py, is timed beside it.
2. COPY: the exact `events` rows the projection makes of those messages (made beforehand, not
   timed), COPYed into a fresh schema the way the replay loads it: in chunks, on as many
   connections as the replay has workers, secondary indexes built once the rows are in.
3. replay: `warden audit replay` (`replay.replay`) into another fresh schema.

Prints a table and writes bench/results/replay.json. `run_w4` runs it all on servers that are
already up (bench/run.py calls it).

Workloads (`--mix`): `steps`, the default, is the shape this benchmark has always used: each run is
a run.submitted command, run.started and 98 step.completed events. `governed` is a governed run
as the stack writes it: decisions, queueing, 10 tool calls (request, decision, completion), 20
steps and the result, with a trace context on every message and an invalid command (and its
rejection) every 50 runs; it fills the decisions and tool_calls tables too.

The streams are filled with atomic batch publishes (1,000 messages a commit, commits pipelined):
with fsync always, JetStream syncs each publish, so message-at-a-time filling runs at about 4k/s
here. The messages are stored with the batch's two headers besides their own.
"""

import argparse
import asyncio
import json
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from bench.common import BenchServers, admin_connect, superuser_seed
from warden.admission import CommandRules
from warden.audit_projector.copy_codec import connect_for_copy
from warden.audit_projector.projection import EVENT_COLUMNS, EventRow, project
from warden.audit_projector.replay import default_workers, prepare_target, replay
from warden.audit_projector.replay_segment import COPY_CHUNK, cyclic_gc_paused
from warden.audit_projector.stream_reader import read_range
from warden.bus import envelope_headers
from warden.messages import (
    CommandRejected,
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
)
from warden.settings import Settings
from warden.streams import StreamNames, provision
from warden.subjects import Subjects

RESULTS = Path(__file__).parent / "results"
BATCH = 1000  # messages per atomic batch: the server's default ceiling
COMMITS_IN_FLIGHT = 16
NATS_PY_SAMPLE = 200_000  # nats-py is timed on at most this many messages (it is the slow reference)

Message = tuple[str, bytes, dict[str, str]]  # subject, body, headers


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def steps_run(subjects: Subjects, run: int) -> Iterator[Message]:
    """A run.submitted command, run.started and 98 step.completed events (100 messages)."""
    cause = make_envelope(RunSubmitted(agent="bench"), tenant="acme", entity_id=f"run-{run}", actor="a", source="b")
    started = make_envelope(
        RunStarted(decision_id="d", worker="w"),
        tenant="acme",
        entity_id=f"run-{run}",
        actor="runner",
        source="b",
        caused_by=cause,
    )
    batch: list[Envelope[Any]] = [cause, started]
    batch += [
        make_envelope(
            StepCompleted(step=i, kind="model_turn"),
            tenant="acme",
            entity_id=f"run-{run}",
            actor="runner",
            source="b",
            caused_by=cause,
        )
        for i in range(98)
    ]
    for envelope in batch:
        yield subjects.expected_subject(envelope), envelope.to_bytes(), envelope_headers(envelope)


def governed_run(subjects: Subjects, run: int, commands_seq: list[int]) -> Iterator[Message]:
    """A governed run as the stack writes it (106 messages, 107 with an invalid command every 50 runs).

    `commands_seq` counts the commands published so far: the commands stream's sequence, which
    decisions and rejections point at.
    """
    tenant, run_id = ("acme", "globex", "initech")[run % 3], f"run-{run}"
    traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"

    def message(envelope: Envelope[Any]) -> Message:
        headers = envelope_headers(envelope)
        headers["traceparent"] = traceparent
        if envelope.data.KIND == "command":
            commands_seq[0] += 1
        return subjects.expected_subject(envelope), envelope.to_bytes(), headers

    def envelope(data: Payload, caused_by: Envelope[Any] | None, actor: str = "runner") -> Envelope[Any]:
        return make_envelope(data, tenant=tenant, entity_id=run_id, actor=actor, source="bench", caused_by=caused_by)

    submitted = envelope(RunSubmitted(agent="bench", input={"q": f"question {run}"}), None, "alice")
    yield message(submitted)
    decision = envelope(
        DecisionMade(
            decision_id=f"d-{run}",
            request_type=RunSubmitted.TYPE,
            request_id=submitted.id,
            request_seq=commands_seq[0],
            effect="allow",
            reasons=["agent allowed"],
            policy_revision="r1",
            evaluation_ms=0.12,
        ),
        submitted,
        "policy-gate",
    )
    yield message(decision)
    yield message(envelope(RunQueued(decision_id=f"d-{run}", priority=5, agent="bench", request_seq=1), decision))
    yield message(envelope(RunDispatched(decision_id=f"d-{run}", agent="bench", request_seq=1), decision))
    yield message(envelope(RunStarted(decision_id=f"d-{run}", worker="w1"), decision))
    step = 0
    for call in range(10):
        yield message(envelope(StepCompleted(step=step, kind="model_turn", summary="thinking"), submitted))
        step += 1
        call_id = f"tc-{run}-{call}"
        requested = envelope(
            ToolCallRequested(tool_call_id=call_id, step=step, agent="bench", tool="web.fetch", arguments={"url": "x"}),
            submitted,
        )
        yield message(requested)
        allowed = envelope(
            DecisionMade(
                decision_id=f"d-{run}-{call}",
                request_type=ToolCallRequested.TYPE,
                request_id=requested.id,
                request_seq=commands_seq[0],
                effect="allow",
                policy_revision="r1",
                evaluation_ms=0.05,
                tool_call_id=call_id,
            ),
            requested,
            "policy-gate",
        )
        yield message(allowed)
        completed = ToolCallCompleted(
            tool_call_id=call_id,
            step=step,
            tool="web.fetch",
            decision_id=f"d-{run}-{call}",
            outcome="ok",
            result={"status": 200},
        )
        yield message(envelope(completed, allowed))
        yield message(envelope(StepCompleted(step=step, kind="tool_call"), submitted))
        step += 1
    yield message(envelope(RunSucceeded(output={"answer": run}, steps=step, tool_calls=10), submitted))
    if run % 50 == 0:
        garbage = b'{"not": "an envelope", "run": %d}' % run
        yield subjects.command(tenant, RunSubmitted.TYPE), garbage, {"Nats-Msg-Id": f"garbage-{run}"}
        commands_seq[0] += 1
        rejection = CommandRejected(
            code="schema_invalid",
            reason="id: Field required",
            command_subject=subjects.command(tenant, RunSubmitted.TYPE),
            command_stream_seq=commands_seq[0],
            size_bytes=len(garbage),
        )
        rejected = make_envelope(
            rejection, tenant=tenant, entity_id=str(commands_seq[0]), actor="policy-gate", source="bench"
        )
        yield message(rejected)


def workload(subjects: Subjects, mix: str, count: int) -> Iterator[Message]:
    commands_seq = [0]
    run = 0
    while True:
        run += 1
        messages = steps_run(subjects, run) if mix == "steps" else governed_run(subjects, run, commands_seq)
        for item in messages:
            yield item
            count -= 1
            if count == 0:
                return


# --------------------------------------------------------------------------------------------
# Filling the streams
# --------------------------------------------------------------------------------------------


async def fill(nats_url: str, prefix: str, count: int, mix: str) -> None:
    """Provision the audited streams under `prefix` and store `count` messages, in atomic batches."""
    subjects = Subjects(prefix)
    nc = await admin_connect(nats_url)
    try:
        js = nc.jetstream()
        await provision(js, subjects)
        names = StreamNames.for_prefix(prefix)
        for stream in names.audited:  # the benchmark's own streams: batches need this
            config = (await js.stream_info(stream)).config
            config.allow_atomic = True
            await js.update_stream(config)
        batches: dict[bool, list[Message]] = {True: [], False: []}
        commits: list[asyncio.Future[Any]] = []
        for item in workload(subjects, mix, count):
            batch = batches[".cmd." in item[0]]
            batch.append(item)
            if len(batch) == BATCH:
                commits.append(await _publish_batch(nc, batch))
                batch.clear()
                if len(commits) >= COMMITS_IN_FLIGHT:
                    await asyncio.gather(*commits)
                    commits.clear()
        for batch in batches.values():
            if batch:
                commits.append(await _publish_batch(nc, batch))
        await asyncio.gather(*commits)
    finally:
        await nc.close()


async def _publish_batch(nc: NatsClient, batch: list[Message]) -> "asyncio.Future[Any]":
    """Publish one atomic batch; return the future of its commit's acknowledgement."""
    batch_id = uuid.uuid4().hex
    for position, (subject, data, headers) in enumerate(batch[:-1], 1):
        await nc.publish(
            subject, data, headers={**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(position)}
        )
    subject, data, headers = batch[-1]
    headers = {**headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(len(batch)), "Nats-Batch-Commit": "1"}
    return await nc.jetstream().publish_async(subject, data, headers=headers)


# --------------------------------------------------------------------------------------------
# The floors
# --------------------------------------------------------------------------------------------


async def _audited(nc: NatsClient, prefix: str) -> list[tuple[str, str, int]]:
    subjects, names = Subjects(prefix), StreamNames.for_prefix(prefix)
    js = nc.jetstream()
    filters = ((names.commands, subjects.all_commands), (names.events, subjects.all_events))
    return [(stream, subject, (await js.stream_info(stream)).state.last_seq) for stream, subject in filters]


async def raw_read(nats_url: str, prefix: str) -> tuple[int, float]:
    """Floor 1: every message of both streams through the replay's bare reader, and nothing else."""
    nc = await admin_connect(nats_url)
    try:
        streams = await _audited(nc, prefix)
        count, started = 0, time.perf_counter()
        with cyclic_gc_paused():
            for stream, subject, last_seq in streams:
                async for batch in read_range(nc, stream, subject, 1, last_seq, seed_file=superuser_seed(nats_url)):
                    count += len(batch)
        return count, time.perf_counter() - started
    finally:
        await nc.close()


async def nats_py_ordered_read(nats_url: str, prefix: str, limit: int) -> tuple[int, float]:
    """Reference: nats-py's ordered push consumer with a callback, on the events stream (up to `limit`)."""
    nc = await admin_connect(nats_url)
    try:
        stream, _, last_seq = (await _audited(nc, prefix))[1]
        last = min(last_seq, limit)
        done = asyncio.get_running_loop().create_future()
        count = 0

        async def received(message: Msg) -> None:
            nonlocal count
            count += 1
            if message.metadata.sequence.stream >= last and not done.done():
                done.set_result(None)

        started = time.perf_counter()
        subscription = await nc.jetstream().subscribe(
            "", stream=stream, cb=received, ordered_consumer=True, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await done
        seconds = time.perf_counter() - started
        await subscription.unsubscribe()
        return count, seconds
    finally:
        await nc.close()


async def copy_floor(nats_url: str, database_url: str, prefix: str, connections: int) -> tuple[int, float]:
    """Floor 2: COPY the exact `events` rows the projection makes, the way the replay loads them."""
    rules = CommandRules(Subjects(prefix), Settings().max_command_bytes)
    chunks: list[list[EventRow]] = []
    nc = await admin_connect(nats_url)
    try:
        with cyclic_gc_paused():
            for stream, subject, last_seq in await _audited(nc, prefix):
                async for batch in read_range(nc, stream, subject, 1, last_seq, seed_file=superuser_seed(nats_url)):
                    rows = project(batch, rules).events
                    if chunks and len(chunks[-1]) < COPY_CHUNK:
                        chunks[-1] += rows
                    else:
                        chunks.append(rows)
    finally:
        await nc.close()
    schema = "copy_floor"
    indexes = await prepare_target(database_url, schema, rules, list(StreamNames.for_prefix(prefix).audited))
    pending = list(reversed(chunks))
    writers = [await connect_for_copy(database_url) for _ in range(connections)]

    async def write(connection: asyncpg.Connection) -> None:
        while pending:
            records = pending.pop()
            await connection.copy_records_to_table("events", records=records, columns=EVENT_COLUMNS, schema_name=schema)

    started = time.perf_counter()
    await asyncio.gather(*(write(connection) for connection in writers))
    await asyncio.gather(
        *(_build(connection, indexes["events"][i::connections]) for i, connection in enumerate(writers))
    )
    seconds = time.perf_counter() - started
    for connection in writers:
        await connection.close()
    return sum(map(len, chunks)), seconds


async def _build(connection: asyncpg.Connection, definitions: list[str]) -> None:
    await connection.execute("SET maintenance_work_mem = '256MB'")
    for definition in definitions:
        await connection.execute(definition)


# --------------------------------------------------------------------------------------------
# W4
# --------------------------------------------------------------------------------------------


async def run_w4(nats_url: str, admin_database_url: str, events: int, mix: str = "steps") -> dict[str, Any]:
    """Fill private streams with `events` messages and measure raw read, COPY and replay on running servers."""
    token = uuid.uuid4().hex[:8]
    prefix, database = f"bench{token}", f"bench_{token}"
    admin = await asyncpg.connect(admin_database_url)
    await admin.execute(f"CREATE DATABASE {database}")
    database_url = admin_database_url.rsplit("/", 1)[0] + f"/{database}"
    # The replay reads as a superuser here (not the projector's identity, which belongs to one installation).
    settings = Settings(
        nats_url=nats_url,
        database_url=database_url,
        subject_prefix=prefix,
        log_level="WARNING",
        nats_seed_file=superuser_seed(nats_url),
    )
    workers = default_workers()
    try:
        fill_started = time.perf_counter()
        await fill(nats_url, prefix, events, mix)
        fill_seconds = time.perf_counter() - fill_started
        read_count, read_seconds = await raw_read(nats_url, prefix)
        nats_py_count, nats_py_seconds = await nats_py_ordered_read(nats_url, prefix, NATS_PY_SAMPLE)
        copy_count, copy_seconds = await copy_floor(nats_url, database_url, prefix, workers)
        report = await replay(settings, "replayed")
        # The same replay reading through nats-py alone: what the bare reader is worth.
        through_nats_py = await replay(settings, "replayed_nats_py", bare_reader=False)
    finally:
        nc = await admin_connect(nats_url)
        names = StreamNames.for_prefix(prefix)
        for stream in names.installation:
            await nc.jetstream().delete_stream(stream)
        await nc.jetstream().delete_key_value(names.scheduler)
        await nc.close()
        await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
        await admin.close()
    raw_rate, copy_rate = read_count / read_seconds, copy_count / copy_seconds
    return {
        "events": report.events_applied,
        "mix": mix,
        "workers": workers,
        "fill_seconds": round(fill_seconds, 1),
        "raw_read_events_per_second": round(raw_rate),
        "nats_py_ordered_read_events_per_second": round(nats_py_count / nats_py_seconds),
        "copy_rows_per_second": round(copy_rate),
        "replay_events_per_second": round(report.events_per_second),
        "replay_seconds": round(report.seconds, 3),
        "replay_nats_py_reader_events_per_second": round(through_nats_py.events_per_second),
        "replay_bare_to_nats_py_reader": round(report.events_per_second / through_nats_py.events_per_second, 2),
        "replay_to_raw_read": round(report.events_per_second / raw_rate, 3),
        "replay_to_copy": round(report.events_per_second / copy_rate, 3),
        # CPU seconds the replay's workers spent per event (reading, projecting, COPYing).
        "replay_worker_cpu_us_per_event": round(report.segment_cpu_seconds / max(1, report.events_applied) * 1e6, 1),
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        ("raw read (bare pull consumer)", result["raw_read_events_per_second"], "events/s"),
        ("nats-py ordered consumer, callback", result["nats_py_ordered_read_events_per_second"], "events/s"),
        ("COPY of the events rows", result["copy_rows_per_second"], "rows/s"),
        ("replay", result["replay_events_per_second"], "events/s"),
        ("replay, reading through nats-py only", result["replay_nats_py_reader_events_per_second"], "events/s"),
    ]
    lines = [f"W4 replay, {result['events']:,} events ({result['mix']} mix, {result['workers']} workers)"]
    lines += [f"  {label:<36} {value:>10,} {unit}" for label, value, unit in rows]
    lines.append(
        f"  replay / raw read {result['replay_to_raw_read']:.2f}, replay / COPY {result['replay_to_copy']:.2f}"
    )
    return "\n".join(lines)


async def main(events: int, mix: str) -> None:
    external = os.environ.get("WARDEN_NATS_URL") and os.environ.get("WARDEN_DATABASE_URL")
    if external:
        result = await run_w4(os.environ["WARDEN_NATS_URL"], os.environ["WARDEN_DATABASE_URL"], events, mix)
        result["servers"] = "external"
    else:
        servers = BenchServers(Path(tempfile.mkdtemp(prefix="warden-bench-")), sync="always")
        endpoints = await servers.start()
        try:
            result = await run_w4(endpoints.nats_url, endpoints.admin_database_url, events, mix)
        finally:
            await servers.stop()
        result["servers"] = "embedded (fsync always)"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replay.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--mix", choices=("steps", "governed"), default="steps")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.events, arguments.mix))
