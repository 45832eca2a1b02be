"""W3: whole governed runs (a scripted agent with three tool calls), every step decided and projected."""

import asyncio
import time
import uuid
from typing import Any

import asyncpg
from nats.aio.msg import Msg

from bench.common import CpuMeter, Installation, ServiceProcesses, admin_connect, latency_summary
from warden.client import WardenClient
from warden.database import DatabaseRole
from warden.streams import StreamNames

SERVICES = ("audit_projector", "policy_gate", "scheduler", "agent_runner")
AGENT = "researcher"
TENANTS = {"acme": "alice", "globex": "gina"}


async def _projected(install: Installation) -> None:
    """Wait until the projector has written every stored message of both audited streams."""
    nc = await admin_connect(install.settings.nats_url)
    names = StreamNames.for_prefix(install.settings.subject_prefix)
    stored = sum([(await nc.jetstream().stream_info(name)).state.last_seq for name in names.audited])
    await nc.close()
    db = await asyncpg.connect(install.settings.database_url_for(DatabaseRole.READER))
    try:
        # Polling: the position lives in another process's Postgres rows, no event to wait on.
        while (await db.fetchval("SELECT coalesce(sum(last_seq), 0) FROM projector_positions")) < stored:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    finally:
        await db.close()


async def run_w3(nats_url: str, admin_url: str, runs: int, concurrency: int) -> dict[str, Any]:
    """Closed loop: `concurrency` runs in flight across two tenants until `runs` have succeeded.

    Also reports the CPU each process spent per run, from the end of the warm-up until every run
    is projected: where the time goes, without a profiler.
    """
    install = await Installation.create(
        nats_url, admin_url, tenant_concurrency=concurrency, runner_concurrency=concurrency
    )
    services = ServiceProcesses(install.settings)
    await services.start(*SERVICES)
    nc = await admin_connect(nats_url)
    client = WardenClient(nc, install.settings.subject_prefix)
    finished: dict[str, asyncio.Future[str]] = {}

    async def on_finish(message: Msg) -> None:
        waiter = finished.pop(message.subject.split(".")[4], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.subject.rsplit(".", 1)[-1])

    prefix = install.settings.subject_prefix
    await nc.subscribe(f"{prefix}.evt.*.run.*.run.succeeded", cb=on_finish)
    await nc.subscribe(f"{prefix}.evt.*.run.*.run.failed", cb=on_finish)

    async def one_run(index: int) -> float:
        tenant = list(TENANTS)[index % len(TENANTS)]
        run_id = uuid.uuid4().hex
        finished[run_id] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await client.submit_run(tenant=tenant, agent=AGENT, actor=TENANTS[tenant], run_id=run_id)
        outcome = await asyncio.wait_for(finished[run_id], 120)
        if outcome != "succeeded":
            raise RuntimeError(f"run {run_id} {outcome}")
        return time.perf_counter() - started

    # Warm-up: every service has loaded its code and built its policy engine.
    await asyncio.gather(*(one_run(i) for i in range(min(concurrency, 20))))
    idle = services.resident_mb()
    await _projected(install)

    latencies: list[float] = []
    peak: dict[str, float] = {}
    counter = iter(range(runs))

    async def worker() -> None:
        for index in counter:
            latencies.append(await one_run(index))

    async def sample_memory(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for name, size in services.resident_mb().items():
                peak[name] = max(peak.get(name, 0.0), size)
            await asyncio.sleep(0.5)

    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(stop))
    cpu = CpuMeter()
    cpu.start()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    completed = time.perf_counter() - started
    await _projected(install)
    projected = time.perf_counter() - started
    cpu_seconds = cpu.stop()  # while the services still run
    stop.set()
    await sampler
    await services.stop()
    await nc.close()
    return {
        "runs": runs,
        "concurrency": concurrency,
        "runs_per_second": round(runs / completed, 1),
        "runs_per_second_projected": round(runs / projected, 1),
        "latency": latency_summary(latencies),
        "resident_mb_idle": idle,
        "resident_mb_peak": peak,
        "cpu_ms_per_run": {role: round(seconds / runs * 1000, 2) for role, seconds in cpu_seconds.items()},
    }
