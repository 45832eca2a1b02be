"""A service whose consumer or stream is deleted under it says so and exits, to be started again by its
supervisor, which re-creates what it reads from; it never sits deaf."""

import asyncio
import json
import sys
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError

from tests.conftest import REPO_ROOT, eventually, settings_env
from warden.settings import Settings
from warden.streams import StreamNames, provision
from warden.subjects import Subjects

# (service, the stream it reads, its durable consumer)
DURABLES = [
    pytest.param("policy_gate", "commands", "policy_gate", id="gate"),
    pytest.param("agent_runner", "work", "agent_runner", id="runner"),
    pytest.param("audit_projector", "events", "audit_projector", id="projector"),
    pytest.param("audit_projector", "advisories", "audit_projector", id="projector-advisories"),
]


async def start(settings: Settings, service: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"warden.{service}",
            cwd=REPO_ROOT,
            env={**settings_env(settings), "WARDEN_LOG_FORMAT": "json"},
            stderr=output,
        )


def lost_lines(log: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if "gone" in str(line.get("event", ""))]


async def consumer_of(js: JetStreamContext, stream: str, name: str) -> ConsumerInfo | None:
    try:
        info: ConsumerInfo = await js.consumer_info(stream, name)
    except NotFoundError:
        return None
    return info


async def consuming(js: JetStreamContext, stream: str, name: str) -> ConsumerInfo | None:
    """The consumer, once a subscription is bound to it (push) or pulling from it."""
    info = await consumer_of(js, stream, name)
    return info if info is not None and (info.push_bound or info.num_waiting) else None


async def exited(process: asyncio.subprocess.Process) -> bool:
    return process.returncode is not None


@pytest.mark.parametrize(("service", "stream", "durable"), DURABLES)
async def test_a_deleted_consumer_is_noticed_and_made_again(
    settings: Settings, nc: NatsClient, tmp_path: Path, service: str, stream: str, durable: str
) -> None:
    name = getattr(StreamNames.for_prefix(settings.subject_prefix), stream)
    js = nc.jetstream()
    log = tmp_path / f"{service}.log"
    process = await start(settings, service, log)
    try:
        # Deleted under a running subscriber (FastStream's would make it again if it were not yet bound).
        await eventually(lambda: consuming(js, name, durable), within=30)
        await js.delete_consumer(name, durable)
        await eventually(lambda: exited(process), within=45)
        [line] = lost_lines(log)
        assert line["level"] == "error"
        assert f"the consumer {durable} on {name}" == line["lost"]
        # Started again (as its supervisor does), it makes its consumer again.
        process = await start(settings, service, log)
        info = await eventually(lambda: consumer_of(js, name, durable), within=30)
        assert info.name == durable
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def test_the_scheduler_notices_its_stream_deleted(settings: Settings, nc: NatsClient, tmp_path: Path) -> None:
    events = StreamNames.for_prefix(settings.subject_prefix).events
    log = tmp_path / "scheduler.log"
    process = await start(settings, "scheduler", log)
    try:
        await asyncio.sleep(2)  # its fold is reading
        assert process.returncode is None
        await nc.jetstream().delete_stream(events)
        await eventually(lambda: exited(process), within=45)
        [line] = lost_lines(log)
        assert line["lost"] == f"the stream {events}"
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        with pytest.raises(NotFoundError):
            await nc.jetstream().stream_info(events)
        await provision(nc.jetstream(), Subjects(settings.subject_prefix))  # for the fixture's clean-up
