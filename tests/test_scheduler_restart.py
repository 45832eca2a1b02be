"""The scheduler restarts in time flat in history: it folds from a watermark, and forgets no live run."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client as NatsClient

from tests.conftest import eventually
from warden.bus import envelope_headers
from warden.messages import (
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunQueued,
    RunSubmitted,
    RunSucceeded,
    make_envelope,
)
from warden.permissions import Role
from warden.scheduler.app import Scheduler
from warden.service import service_broker
from warden.settings import Settings
from warden.streams import StreamNames
from warden.subjects import Subjects


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[NatsBroker]:
    broker = service_broker(settings, Role.SCHEDULER)
    await broker.connect()
    yield broker
    await broker.stop()


async def publish(nc: NatsClient, settings: Settings, envelope: Envelope[Any], key: str | None = None) -> int:
    stream = StreamNames.for_prefix(settings.subject_prefix)
    subjects = Subjects(settings.subject_prefix)
    name = stream.commands if envelope.data.KIND == "command" else stream.events
    ack = await nc.jetstream().publish(
        subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope, key), stream=name
    )
    return ack.seq


async def allowed_run(nc: NatsClient, settings: Settings, run_id: str) -> Envelope[Any]:
    """A submission and the gate's allow, as the gate would record them; the decision is returned."""
    submitted = make_envelope(RunSubmitted(agent="demo"), tenant="acme", entity_id=run_id, actor="alice", source="t")
    seq = await publish(nc, settings, submitted)
    decision = DecisionMade(
        decision_id=f"d-{run_id}",
        request_type=RunSubmitted.TYPE,
        request_id=submitted.id,
        request_seq=seq,
        effect="allow",
        policy_revision="p",
        evaluation_ms=0.1,
    )
    allow = make_envelope(decision, tenant="acme", entity_id=run_id, actor="gate", source="t", caused_by=submitted)
    await publish(nc, settings, allow)
    return allow


async def finished_run(nc: NatsClient, settings: Settings, run_id: str) -> None:
    """A run's whole life as the scheduler and a runner record it."""
    allow = await allowed_run(nc, settings, run_id)
    later: list[Payload] = [
        RunQueued(decision_id=f"d-{run_id}", priority=5, agent="demo", request_seq=1),
        RunDispatched(decision_id=f"d-{run_id}", agent="demo", request_seq=1),
        RunSucceeded(steps=0, tool_calls=0),
    ]
    for payload in later:
        await publish(
            nc,
            settings,
            make_envelope(payload, tenant="acme", entity_id=run_id, actor="s", source="t", caused_by=allow),
        )


async def caught_up(settings: Settings, broker: NatsBroker) -> tuple[Scheduler, "asyncio.Task[None]"]:
    scheduler = Scheduler(settings.model_copy(update={"tenant_concurrency": 100}), broker)
    task = asyncio.create_task(scheduler.serve())

    async def ready() -> bool:
        if task.done():
            task.result()
        return scheduler.caught_up

    await eventually(ready)
    return scheduler, task


async def stop(task: "asyncio.Task[None]") -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_restart_folds_only_from_the_oldest_run_in_play(
    settings: Settings, nc: NatsClient, broker: NatsBroker
) -> None:
    """Forty finished runs, then one still running: a restart folds that run's events, not the forty."""
    for index in range(40):
        await finished_run(nc, settings, f"old-{index}")
    first, task = await caught_up(settings, broker)
    assert first.folded == 40 * 4, "with no watermark yet, the first start folds everything"
    await eventually(lambda: _true(first.watermark_kept > 1))
    live = await allowed_run(nc, settings, "live")
    await eventually(lambda: _true("live" in first.state.running["acme"]))
    await asyncio.sleep(1.2)  # the watermark is written at most once a second
    await first.keep_watermark(
        await nc.jetstream().key_value(StreamNames.for_prefix(settings.subject_prefix).scheduler)
    )
    await stop(task)

    second, task = await caught_up(settings, broker)
    try:
        assert second.folded == 3, "the live run's decision, queueing and dispatch, nothing older"
        assert second.state.running["acme"] == {"live"}
        assert live.entity_id == "live"
    finally:
        await stop(task)


async def test_a_second_decision_on_a_forgotten_run_does_not_queue_it_again(
    settings: Settings, nc: NatsClient, broker: NatsBroker
) -> None:
    """A run finished before the watermark, allowed again (a resubmission): it is not run twice."""
    await finished_run(nc, settings, "done")
    first, task = await caught_up(settings, broker)
    await asyncio.sleep(1.2)
    await first.keep_watermark(
        await nc.jetstream().key_value(StreamNames.for_prefix(settings.subject_prefix).scheduler)
    )
    await stop(task)
    await allowed_run(nc, settings, "done")  # the same run id, decided again
    await allowed_run(nc, settings, "fresh")

    second, task = await caught_up(settings, broker)
    try:
        await eventually(lambda: _true(second.state.running["acme"] == {"fresh"}))
        await asyncio.sleep(1.0)  # time for a wrong second queueing to show
        assert second.state.running["acme"] == {"fresh"}
        subject = Subjects(settings.subject_prefix).event("acme", RunQueued, "done")
        events = StreamNames.for_prefix(settings.subject_prefix).events
        info = await nc.jetstream().stream_info(events, subjects_filter=subject)
        assert (info.state.subjects or {}).get(subject) == 1, "queued once, by the first life of the run"
    finally:
        await stop(task)


async def _true(value: bool) -> bool:
    return value
