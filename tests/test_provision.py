"""Provisioning: streams made as declared, never weakened without --force, and seed-node lists accepted."""

import socket
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from tests.conftest import AppRunner, eventually, run_warden_cli
from tests.test_governed_run import run_row, start_all
from warden.client import WardenClient
from warden.identity import connect_options
from warden.permissions import Role
from warden.settings import Settings
from warden.streams import StreamNames, _differences, provision
from warden.subjects import Subjects
from warden.wire import connect, server_urls


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


LIVE = StreamConfig(
    name="S",
    subjects=["s.>"],
    num_replicas=3,
    storage=StorageType.FILE,
    retention=RetentionPolicy.LIMITS,
    discard=DiscardPolicy.NEW,
    max_msgs=-1,
    max_age=0,
    duplicate_window=120.0,
)


@pytest.mark.parametrize(
    ("declared", "weakening"),
    [
        pytest.param({"num_replicas": 1}, {"num_replicas"}, id="fewer-replicas"),
        pytest.param({"num_replicas": 5}, set(), id="more-replicas"),
        pytest.param({"storage": StorageType.MEMORY}, {"storage"}, id="memory"),
        pytest.param({"discard": DiscardPolicy.OLD}, {"discard"}, id="discard-old"),
        pytest.param({"retention": RetentionPolicy.WORK_QUEUE}, {"retention"}, id="retention"),
        pytest.param({"max_msgs": 1000}, {"max_msgs"}, id="a-limit"),
        pytest.param({"max_age": 3600.0}, {"max_age"}, id="an-age"),
        pytest.param({"duplicate_window": 600.0, "description": "x"}, set(), id="harmless"),
    ],
)
def test_what_weakens_a_stream(declared: dict[str, Any], weakening: set[str]) -> None:
    """Fewer replicas, memory, dropping old messages, another retention, new limits: weakening; the rest is not."""
    wanted = replace(LIVE, **declared)
    changes = _differences(LIVE, wanted)
    assert {change.setting for change in changes} == set(declared)
    assert {change.setting for change in changes if change.weakens} == weakening


async def test_provisioning_twice_changes_nothing(settings: Settings, nc: NatsClient) -> None:
    """The streams the test fixture made are as declared: a second provisioning has nothing to do."""
    result = await provision(nc.jetstream(), Subjects(settings.subject_prefix))
    assert (result.created, result.changed, result.refused) == ([], [], [])


async def test_provisioning_strengthens_a_stream_and_leaves_limits_set_by_hand(
    settings: Settings, nc: NatsClient
) -> None:
    """A stream made weaker by hand is brought back to the declared settings; a limit nothing declares is left
    alone. (Refusing to weaken needs replicas to lose: tests/test_cluster.py shows it on three nodes.)"""
    js = nc.jetstream()
    events = StreamNames.for_prefix(settings.subject_prefix).events
    config = (await js.stream_info(events)).config
    config.discard = DiscardPolicy.OLD  # a weaker stream to start from: provisioning strengthens it
    await js.update_stream(config)
    strengthened = await provision(js, Subjects(settings.subject_prefix))
    assert [str(change) for change in strengthened.changed] == [f"{events}: discard 'old' -> 'new'"]

    config = (await js.stream_info(events)).config
    config.max_msgs = 10_000_000  # set by hand; nothing declared, so provisioning leaves it
    config.num_replicas = 1
    await js.update_stream(config)
    result = await run_warden_cli(settings, "provision", "--replicas", "1")
    assert result.status == 0, result.stdout
    # The stream has one replica, the most a single node holds; asking for none less is not weakening.
    assert "refused" not in result.stdout


def test_a_list_of_seed_nodes_is_split() -> None:
    assert server_urls("nats://a:4222, nats://b:4222,") == ["nats://a:4222", "nats://b:4222"]
    with pytest.raises(ValueError, match="no NATS server"):
        server_urls(" , ")


async def test_everything_starts_with_a_seed_node_down(
    settings: Settings, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """WARDEN_NATS_URL names a node that is down first: the services, the client and the CLI use the next."""
    listed = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{_closed_port()},{settings.nats_url}"})
    await start_all(run_app, listed)
    operator = settings.seed_file_for(Role.OPERATOR)
    async with await WardenClient.connect(listed.nats_url, listed.subject_prefix, seed_file=operator) as client:
        receipt = await client.submit_run(tenant="acme", agent="demo", actor="alice")
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded"
    printed = await run_warden_cli(listed, "tail", "--tenant", "acme", "--run", receipt.run_id, "--idle-timeout", "1")
    assert printed.status == 0
    assert "run.succeeded" in printed.stdout
    nc = await connect(listed.nats_url, **connect_options(operator))
    await nc.close()
