"""Warden on a real three-node JetStream cluster (R3 streams): a stream leader killed mid-load loses nothing.

The four services run as their own processes, connected to the cluster's seed list. While governed
runs flow, the leader of the events stream is killed with SIGKILL and started again, then the
leader of the commands stream. Every acknowledged run must finish as it would have without the
fault: succeeded, each tool call run once and decided, the projection equal to the stream on every
node, and every service still the process it started as.
"""

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import Servers, eventually, start_services, stop_services
from warden.audit_projector.install import drop_roles, install_database
from warden.bus import retry_transient
from warden.client import Receipt, WardenClient
from warden.database import DatabaseRole, with_database, without_login
from warden.embedded import EmbeddedServers, NatsNode
from warden.errors import RetryableError
from warden.settings import Settings
from warden.stack import SERVICES
from warden.streams import Change, StreamNames, provision
from warden.subjects import Subjects
from warden.wire import connect


@dataclass
class Cluster:
    servers: EmbeddedServers
    settings: Settings
    nc: NatsClient

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.servers.nodes if node.name == name)

    async def leader(self, stream: str) -> str:
        async def elected() -> str | None:
            try:
                info = await self.nc.jetstream().stream_info(stream)
            except Exception:
                return None
            return info.cluster.leader if info.cluster else None

        leader: str = await eventually(elected, within=60, interval=0.1)
        return leader


@pytest.fixture
async def cluster(servers: Servers) -> AsyncIterator[Cluster]:
    """Three NATS nodes on loopback with R3 streams under a private prefix, and a private database."""
    state = Path(tempfile.mkdtemp(prefix="warden-cluster-"))
    token = uuid.uuid4().hex[:12]
    embedded = EmbeddedServers(state, nats_nodes=3, subject_prefix=f"c{token}", extra_users=[servers.superuser_entry()])
    nats_url = await embedded.start_nats()
    database_url = without_login(with_database(servers.database_url, f"cluster_{token}"))
    await install_database(servers.database_url, database_url, embedded.credentials.directory, f"c{token}")
    settings = Settings(
        nats_url=nats_url,
        database_url=database_url,
        subject_prefix=f"c{token}",
        stream_replicas=3,
        nats_credentials_dir=embedded.credentials.directory,
    )
    nc = await connect(nats_url, **servers.superuser())
    try:
        await provision(nc.jetstream(), Subjects(settings.subject_prefix), replicas=3)
        yield Cluster(embedded, settings, nc)
    finally:
        await nc.close()
        await embedded.stop()
        shutil.rmtree(state, ignore_errors=True)
        admin = await asyncpg.connect(with_database(servers.database_url, "postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "cluster_{token}" WITH (FORCE)')
        await admin.close()
        await drop_roles(servers.database_url, f"cluster_{token}")


@pytest.fixture
async def services(cluster: Cluster, tmp_path: Path) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    # Their logs are kept: a failure under failover says what the services saw (see `troubles`).
    processes = await start_services(cluster.settings, tmp_path)
    try:
        yield processes
    finally:
        await stop_services(processes)


def troubles(log_dir: Path, limit: int = 40) -> str:
    """The services' warnings and errors, for an assertion's message: what they saw of the failover."""
    lines = []
    for log in sorted(log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"level": "warning"' in line or '"level": "error"' in line:
                lines.append(f"{log.stem}: {line[:300]}")
    return "\n".join(lines[-limit:]) or "(no warnings or errors)"


def node_stream_state(monitor_url: str, stream: str) -> dict[str, Any]:
    """What one node holds of a stream (its own replica), from its monitoring endpoint."""
    with urllib.request.urlopen(f"{monitor_url}/jsz?accounts=true&streams=true", timeout=5) as response:
        report = json.loads(response.read())
    for account in report.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] == stream:
                return dict(detail["state"])
    return {}


async def kill_leader_and_restart(cluster: Cluster, stream: str) -> float:
    """SIGKILL the node leading `stream`, and start it again once another node leads; the seconds until then."""
    leader = cluster.node(await cluster.leader(stream))
    await leader.kill()
    killed_at = time.monotonic()

    async def new_leader() -> bool:
        return await cluster.leader(stream) != leader.name

    await eventually(new_leader, within=60, interval=0.1)
    resumed = time.monotonic() - killed_at
    await leader.start()
    await leader.wait_ready()
    return resumed


async def test_killing_stream_leaders_mid_load_loses_no_audit_row_and_fails_no_run(
    cluster: Cluster, services: list[asyncio.subprocess.Process], servers: Servers, tmp_path: Path
) -> None:
    """Sixty governed runs; the events then the commands stream leader killed with SIGKILL mid-load."""
    client = WardenClient(cluster.nc, cluster.settings.subject_prefix)
    receipts: list[Receipt] = []

    async def submit(count: int) -> None:
        # As a careful client does: a submission the bus could not acknowledge is sent again, with
        # the same run id (and so the same idempotency key) until it is.
        for index in range(count):
            tenant, actor = ("acme", "alice") if index % 2 else ("globex", "gina")
            run_id = f"run-{index}"
            while True:
                try:
                    receipt = await client.submit_run(
                        tenant=tenant, agent="researcher", actor=actor, input={"topic": f"t{index}"}, run_id=run_id
                    )
                    break
                except RetryableError:
                    await asyncio.sleep(0.2)
            receipts.append(receipt)
            await asyncio.sleep(0.1)

    streams = StreamNames.for_prefix(cluster.settings.subject_prefix)
    load = asyncio.create_task(submit(60))
    await asyncio.sleep(2.0)
    resumed = [await kill_leader_and_restart(cluster, streams.events)]
    await asyncio.sleep(2.0)
    resumed.append(await kill_leader_and_restart(cluster, streams.commands))
    await load

    db = await asyncpg.connect(cluster.settings.database_url_for(DatabaseRole.READER))
    try:
        run_ids = [receipt.run_id for receipt in receipts]
        finished = "SELECT count(*) FROM runs WHERE run_id = ANY($1) AND status IN ('succeeded', 'failed')"
        await eventually(lambda: _equal(db.fetchval(finished, run_ids), len(run_ids)), within=180, interval=0.5)
        failed = await db.fetch(
            "SELECT run_id, error FROM runs WHERE run_id = ANY($1) AND status <> 'succeeded'", run_ids
        )
        assert [tuple(row) for row in failed] == [], troubles(tmp_path)
        tool_calls = await db.fetch(
            "SELECT payload->>'tool_call_id', count(*) AS completions, min(payload->>'outcome') AS outcome "
            "FROM events WHERE type = 'tool_call.completed' GROUP BY 1"
        )
        assert len(tool_calls) == 60 * 3
        assert {row["completions"] for row in tool_calls} == {1}, "no tool ran twice"
        assert {row["outcome"] for row in tool_calls} == {"ok"}, "every tool call was decided and ran"

        async def projected() -> bool:
            try:
                infos = [await cluster.nc.jetstream().stream_info(name) for name in streams.audited]
            except (nats.errors.Error, TimeoutError):
                return False  # the cluster is still settling after the restarts: ask again
            total = sum(info.state.last_seq for info in infos)
            return bool(await db.fetchval("SELECT sum(last_seq) = $1 FROM projector_positions", total))

        await eventually(projected, within=60)
        rows = {row["stream"]: row["count"] for row in await db.fetch("SELECT stream, count(*) FROM events GROUP BY 1")}
        await every_replica_holds(cluster, rows)
        assert await db.fetchval("SELECT count(*) FROM stream_gaps") == 0
    finally:
        await db.close()
    assert [process.returncode for process in services] == [None] * len(SERVICES), troubles(tmp_path)
    print(f"leader re-elected after SIGKILL in {', '.join(f'{seconds:.1f}' for seconds in resumed)} s")


async def every_replica_holds(cluster: Cluster, rows: dict[str, int]) -> None:
    """Wait until every node's replica of each audited stream holds as many messages as Postgres has rows."""
    for node in cluster.servers.nodes:
        assert node.monitor_url is not None

        def replica_matches(monitor_url: str = node.monitor_url) -> bool:
            try:
                states = {name: node_stream_state(monitor_url, name) for name in rows}
            except OSError:
                return False  # the node is still coming back
            return all(state.get("messages") == rows[name] for name, state in states.items())

        await eventually(lambda: _ready(replica_matches()), within=30)


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def _ready(value: bool) -> bool:
    return value


async def test_provisioning_raises_replicas_everywhere_and_lowers_them_only_when_forced(cluster: Cluster) -> None:
    """Streams and the scheduler's bucket go from one replica to three; back to one is refused, then forced."""
    js = cluster.nc.jetstream()
    subjects = Subjects(f"p{uuid.uuid4().hex[:10]}")
    names = StreamNames.for_prefix(subjects.prefix)
    every = [*names.installation, f"KV_{names.scheduler}", f"KV_{names.ledger}"]

    async def replicas() -> dict[str, int | None]:
        return {stream: (await js.stream_info(stream)).config.num_replicas for stream in every}

    def own(changes: list[Change]) -> set[str]:
        # The access stream is the account's, shared with the cluster fixture's installation.
        return {change.stream for change in changes if change.stream != names.access}

    created = await retry_transient(lambda: provision(js, subjects, replicas=1), what="provisioning")
    assert sorted(set(created.created) - {names.access}) == sorted(every)
    raised = await retry_transient(lambda: provision(js, subjects, replicas=3), what="provisioning")
    assert own([change for change in raised.changed if change.setting == "num_replicas"]) == set(every)
    assert await retry_transient(replicas, what="stream info") == dict.fromkeys(every, 3)

    kept = await retry_transient(lambda: provision(js, subjects, replicas=1), what="provisioning")
    assert own(kept.refused) == set(every)
    assert names.access in {change.stream for change in kept.refused}, "the shared stream is never weakened either"
    assert await retry_transient(replicas, what="stream info") == dict.fromkeys(every, 3)
    forced = await retry_transient(lambda: provision(js, subjects, replicas=1, force=True), what="provisioning")
    assert own(forced.changed) == set(every)
    assert await retry_transient(replicas, what="stream info") == dict.fromkeys(every, 1)
