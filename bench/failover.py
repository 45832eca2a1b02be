"""Failover on a three-node JetStream cluster: how long Warden takes to resume after each kind of kill.

    uv run --group bench python -m bench.failover [--rounds 2]

Starts three embedded NATS nodes (fsync always, R3 streams) and Postgres in a temporary directory,
the four services as their own processes, and a steady load of governed runs (`researcher`, three
tool calls each, about four a second). Then, `rounds` times each, it kills with SIGKILL:

- the leader of the events stream;
- the JetStream meta leader;
- a node that leads nothing (the leaderships it held are first moved away with step-down requests);

and starts the node again once the cluster has recovered. For each kill it reports the seconds
until the cluster answered again (the stream has a leader; the meta layer answers) and until a run
submitted just after the kill had succeeded, beside how long a run takes with no fault. At the end:
how many runs were submitted, how many succeeded and failed, and whether every service is still
the process it started as. Writes bench/results/failover.json.
"""

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
from nats.aio.client import Client as NatsClient

from bench.common import REPO_ROOT, BenchServers, Installation, ServiceProcesses, admin_connect
from warden.client import WardenClient
from warden.database import DatabaseRole
from warden.embedded import EmbeddedServers, NatsNode
from warden.errors import RetryableError
from warden.streams import StreamNames

SERVICES = ("audit_projector", "policy_gate", "scheduler", "agent_runner")
RESULTS = REPO_ROOT / "bench" / "results" / "failover.json"
CONSUMERS = (
    ("commands", "policy_gate"),
    ("commands", "audit_projector"),
    ("events", "audit_projector"),
    ("work", "agent_runner"),
)


def jsz(node: NatsNode) -> dict[str, Any]:
    assert node.monitor_url is not None
    with urllib.request.urlopen(f"{node.monitor_url}/jsz?leader-only=false", timeout=2) as response:
        return dict(json.loads(response.read()))


async def until(check: Callable[[], Awaitable[bool]], within: float = 120.0) -> float:
    """Seconds until `check` holds (polling every 50 ms)."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise TimeoutError(f"not within {within}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class Failover:
    def __init__(self, servers: EmbeddedServers, install: Installation, nc: NatsClient) -> None:
        self.servers = servers
        self.install = install
        self.nc = nc
        self.names = StreamNames.for_prefix(install.settings.subject_prefix)
        self.client = WardenClient(nc, install.settings.subject_prefix)
        self.submitted: list[str] = []

    def node(self, name: str | None) -> NatsNode:
        return next(node for node in self.servers.nodes if node.name == name)

    async def stream_leader(self, stream: str) -> str | None:
        try:
            info = await self.nc.jetstream().stream_info(stream)
        except (nats.errors.Error, TimeoutError):
            return None
        return info.cluster.leader if info.cluster else None

    async def meta_leader(self) -> str | None:
        for node in self.servers.nodes:
            if node.process is not None:
                try:
                    leader = jsz(node).get("meta_cluster", {}).get("leader")
                except OSError:
                    continue
                if leader:
                    return str(leader)
        return None

    async def submit(self, index: int) -> str:
        """Submit one run, as a careful client does: again, with the same run id, until acknowledged."""
        run_id = f"run-{index}"
        tenant, actor = ("acme", "alice") if index % 2 else ("globex", "gina")
        while True:
            try:
                await self.client.submit_run(tenant=tenant, agent="researcher", actor=actor, run_id=run_id)
                break
            except RetryableError:
                await asyncio.sleep(0.2)
        self.submitted.append(run_id)
        return run_id

    async def load(self, stop: asyncio.Event) -> None:
        index = 0
        while not stop.is_set():
            await self.submit(index)
            index += 1
            await asyncio.sleep(0.25)

    async def succeeded(self, db: asyncpg.Connection, run_id: str) -> bool:
        try:
            return bool(
                await db.fetchval("SELECT count(*) FROM runs WHERE run_id = $1 AND status = 'succeeded'", run_id)
            )
        except asyncpg.UndefinedTableError:
            return False  # the projector has not made its tables yet

    async def leading_nothing(self) -> NatsNode:
        """A node that leads no stream, no durable consumer and not the meta layer: leaderships moved away."""
        meta = await self.meta_leader()
        candidate = next(node for node in self.servers.nodes if node.name != meta)
        streams = {"commands": self.names.commands, "events": self.names.events, "work": self.names.work}
        for _ in range(20):
            moved = False
            for stream in (*streams.values(), f"KV_{self.names.scheduler}"):
                if await self.stream_leader(stream) == candidate.name:
                    await self.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
                    moved = True
            for key, consumer in CONSUMERS:
                info = await self.nc.jetstream().consumer_info(streams[key], consumer)
                if info.cluster and info.cluster.leader == candidate.name:
                    await self.nc.request(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{streams[key]}.{consumer}", b"", timeout=5)
                    moved = True
            if not moved:
                return candidate
            await asyncio.sleep(1.0)
        raise RuntimeError(f"{candidate.name} kept a leadership")

    async def kill(self, kind: str, db: asyncpg.Connection, index: int) -> dict[str, float]:
        if kind == "events stream leader":
            victim = self.node(await self.stream_leader(self.names.events))
        elif kind == "meta leader":
            victim = self.node(await self.meta_leader())
        else:
            victim = await self.leading_nothing()
        await victim.kill()
        killed = time.monotonic()
        run_id = await self.submit(index)

        async def answers() -> bool:
            leader = await self.stream_leader(self.names.events)
            return leader is not None and leader != victim.name and await self.meta_leader() not in (None, victim.name)

        cluster = await until(answers)
        await until(lambda: self.succeeded(db, run_id))
        run = time.monotonic() - killed
        await victim.start()
        await victim.wait_ready()
        await asyncio.sleep(3.0)  # the node catches up before the next kill
        return {"cluster_answers_s": round(cluster, 2), "run_after_kill_s": round(run, 2)}


async def run_failover(rounds: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="warden-failover-"))
    servers = BenchServers(state, nats_nodes=3)
    endpoints = await servers.start()
    try:
        install = await Installation.create(
            endpoints.nats_url, servers.admin_database_url("postgres"), stream_replicas=3
        )
        services = ServiceProcesses(install.settings)
        await services.start(*SERVICES)
        nc = await admin_connect(endpoints.nats_url)
        db = await asyncpg.connect(install.settings.database_url_for(DatabaseRole.READER))
        failover = Failover(servers, install, nc)
        try:
            warm = [await failover.submit(-1 - index) for index in range(3)]
            await until(lambda: _all(db, failover, warm))
            baseline = []
            for index in range(5):
                started = time.monotonic()
                run_id = await failover.submit(-100 - index)
                await until(lambda run_id=run_id: failover.succeeded(db, run_id))  # type: ignore[misc]
                baseline.append(time.monotonic() - started)
            pids = {label: process.pid for label, process in services.processes.items()}
            stop = asyncio.Event()
            load = asyncio.create_task(failover.load(stop))
            kills: dict[str, list[dict[str, float]]] = {}
            probes = itertools.count(1_000_000)  # run numbers of the runs submitted at a kill
            for _ in range(rounds):
                for kind in ("events stream leader", "meta leader", "a node that leads nothing"):
                    await asyncio.sleep(3.0)
                    outcome = await failover.kill(kind, db, next(probes))
                    kills.setdefault(kind, []).append(outcome)
                    print(f"{kind}: {outcome}", flush=True)
            stop.set()
            await load
            await until(lambda: _all(db, failover, failover.submitted), within=300)
            rows = await db.fetch(
                "SELECT status, count(*) FROM runs WHERE run_id = ANY($1) GROUP BY 1", failover.submitted
            )
            statuses = {row["status"]: row["count"] for row in rows}
            alive = all(
                process.returncode is None and process.pid == pids[label]
                for label, process in services.processes.items()
            )
        finally:
            await db.close()
            await nc.close()
            await services.stop()
    finally:
        await servers.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {
        "run_without_fault_s": round(statistics.median(baseline), 2),
        "kills": kills,
        "runs_submitted": len(failover.submitted),
        "runs_by_status": statuses,
        "services_never_exited": alive,
    }


async def _all(db: asyncpg.Connection, failover: Failover, run_ids: list[str]) -> bool:
    try:
        finished = await db.fetchval(
            "SELECT count(*) FROM runs WHERE run_id = ANY($1) AND status IN ('succeeded', 'failed')", run_ids
        )
    except asyncpg.UndefinedTableError:
        return False  # the projector has not made its tables yet
    return bool(finished == len(run_ids))


async def main(rounds: int) -> None:
    result = await run_failover(rounds)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"a run with no fault takes {result['run_without_fault_s']} s")
    for kind, outcomes in result["kills"].items():
        cluster = ", ".join(str(outcome["cluster_answers_s"]) for outcome in outcomes)
        run = ", ".join(str(outcome["run_after_kill_s"]) for outcome in outcomes)
        print(f"{kind:>26}: cluster answers after {cluster} s; a run submitted at the kill succeeded after {run} s")
    print(
        f"runs: {result['runs_submitted']} submitted, by status {result['runs_by_status']}; "
        f"services never exited: {result['services_never_exited']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="kills of each kind")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds))
