"""W1 and W2: how fast the policy gate answers a tool-call request, against the floor of two bare hops."""

import asyncio
import collections
import dataclasses
import sys
import time
import uuid
from typing import Any, Literal

import asyncpg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import PubAck

from bench.common import (
    REPO_ROOT,
    CpuMeter,
    Installation,
    ServiceProcesses,
    admin_connect,
    latency_summary,
    percentile,
    superuser_seed,
)
from warden.database import DatabaseRole
from warden.messages import ToolCallRequested, make_envelope
from warden.streams import StreamNames, stream_configs
from warden.subjects import Subjects
from warden.wire import command_key_scope

Mode = Literal["warden", "relay"]
# Each persisted message on the decision path: the request (commands) and the decision (events).
PERSISTED_PER_DECISION = 2
_PLACEHOLDER = "R" * 32


def _request_template(prefix: str) -> bytes:
    """A valid tool-call request whose run id is a placeholder: each request swaps in its own."""
    envelope = make_envelope(
        ToolCallRequested(
            tool_call_id=f"{_PLACEHOLDER}-tc0",
            step=0,
            agent="researcher",
            tool="web.fetch",
            arguments={"url": "https://example.com/research"},
        ),
        tenant="acme",
        entity_id=_PLACEHOLDER,
        actor="alice",
        source="bench",
    )
    return envelope.to_bytes()


class DecisionClient:
    """Publishes requests (JetStream, acknowledged) and waits for each one's answer on a core subscription."""

    def __init__(self, nc: NatsClient, prefix: str, mode: Mode) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.prefix = prefix
        self.mode = mode
        self.template = _request_template(prefix)
        self.subject = Subjects(prefix).command("acme", ToolCallRequested.TYPE)
        self.pending: dict[str, asyncio.Future[None]] = {}
        # Warden answers on <p>.evt.acme.run.<run>.decision.made, the relay on <p>.rly.<run>.
        self.run_token = 4 if mode == "warden" else 2

    async def open(self) -> None:
        pattern = f"{self.prefix}.evt.acme.run.*.decision.made" if self.mode == "warden" else f"{self.prefix}.rly.*"
        await self.nc.subscribe(pattern, cb=self._answered)

    async def _answered(self, message: Msg) -> None:
        waiter = self.pending.pop(message.subject.split(".")[self.run_token], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def request(self) -> float:
        run_id = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        self.pending[run_id] = waiter
        body = self.template.replace(_PLACEHOLDER.encode(), run_id.encode())
        started = time.perf_counter()
        # Scoped as every command's key must be (the gate rejects others); the relay carries the same bytes.
        key = command_key_scope("acme", ToolCallRequested.TYPE) + run_id
        await self.js.publish(self.subject, body, headers={"Nats-Msg-Id": key, "Bench-Run": run_id})
        await asyncio.wait_for(waiter, 10.0)
        return time.perf_counter() - started


async def _ready(client: DecisionClient, within: float = 60.0) -> None:
    """Wait until the gate (or relay) answers, then warm it up: first decisions build per-thread engines."""
    deadline = time.monotonic() + within
    while True:
        try:
            await client.request()
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    for _ in range(300):
        await client.request()


async def _relay_stream(nc: NatsClient, prefix: str) -> None:
    """A stream for the relay's second hop, configured exactly like the events stream."""
    events = stream_configs(Subjects(prefix))[1]
    relay = dataclasses.replace(
        events,
        name=f"{StreamNames.for_prefix(prefix).events}_RELAY",
        subjects=[f"{prefix}.rly.>"],
        description="bench relay",
    )
    await nc.jetstream().add_stream(relay)


async def closed_loop(client: DecisionClient, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """`concurrency` requesters, each sending its next request when the last is answered."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def requester() -> None:
        while time.perf_counter() < deadline:
            latencies.append(await client.request())

    started = time.perf_counter()
    await asyncio.gather(*(requester() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


async def open_loop(client: DecisionClient, rate: float, seconds: float) -> list[float]:
    """Requests sent on a fixed schedule, whatever the answers do: latency at a given load."""
    latencies: list[float] = []
    tasks = []
    started = time.perf_counter()
    for index in range(int(rate * seconds)):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(client.request()))
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, float):
            latencies.append(result)
    return latencies


async def raw_publish_rate(nc: NatsClient, prefix: str, seconds: float, window: int = 256) -> float:
    """The floor for throughput: pipelined, acknowledged JetStream publishes of a request-sized message.

    `publish_async` with a window of unacknowledged publishes: the cheapest way nats-py has to keep
    the server busy, so the floor measures the server's storage more than this client's CPU.
    """
    js = nc.jetstream()
    body = _request_template(prefix)
    unacknowledged: collections.deque[asyncio.Future[PubAck]] = collections.deque()
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        if len(unacknowledged) >= window:
            await unacknowledged.popleft()
        unacknowledged.append(await js.publish_async(f"{prefix}.rly.raw", body, headers={"Nats-Msg-Id": f"raw-{sent}"}))
        sent += 1
    await asyncio.gather(*unacknowledged)
    return sent / (time.perf_counter() - started)


async def _start_relay(install: Installation) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.relay",
        install.settings.nats_url,
        install.settings.subject_prefix,
        str(superuser_seed(install.settings.nats_url) or ""),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.readline(), 30)
    return process


async def run_w1(nats_url: str, admin_url: str, samples: int) -> dict[str, Any]:
    """W1: one client, closed loop, one request at a time: the gate against the relay floor."""
    results: dict[str, Any] = {}
    for mode in ("relay", "warden"):
        install = await Installation.create(nats_url, admin_url)
        prefix = install.settings.subject_prefix
        nc = await admin_connect(nats_url)
        await _relay_stream(nc, prefix)
        services = ServiceProcesses(install.settings)
        relay = None
        if mode == "warden":
            await services.start("policy_gate")
        else:
            relay = await _start_relay(install)
        client = DecisionClient(nc, prefix, mode)
        await client.open()
        await _ready(client)
        latencies = [await client.request() for _ in range(samples)]
        results[mode] = latency_summary(latencies)
        await services.stop()
        if relay:
            relay.terminate()
            await relay.wait()
        await nc.close()
    results["p50_ratio"] = round(results["warden"]["p50_ms"] / results["relay"]["p50_ms"], 2)
    return results


async def _projection_lag(install: Installation, stop: asyncio.Event) -> dict[str, float]:
    """Sample how many stored messages the projector has not yet written, and how stale its newest row is."""
    nc = await admin_connect(install.settings.nats_url)
    js = nc.jetstream()
    names = StreamNames.for_prefix(install.settings.subject_prefix)
    db = await asyncpg.connect(install.settings.database_url_for(DatabaseRole.READER))
    behind: list[float] = []
    stale: list[float] = []
    while not stop.is_set():
        await asyncio.sleep(0.25)
        stored = sum([(await js.stream_info(name)).state.last_seq for name in names.audited])
        try:
            projected = await db.fetchval("SELECT coalesce(sum(last_seq), 0) FROM projector_positions")
            newest = await db.fetchval("SELECT extract(epoch FROM now() - max(stored_at))::float8 FROM events")
        except asyncpg.UndefinedTableError:
            continue
        behind.append(float(stored - projected))
        if newest is not None:
            stale.append(float(newest))
    await db.close()
    await nc.close()
    return {
        "max_messages_behind": max(behind, default=0),
        "p50_messages_behind": percentile(behind, 0.5),
        "max_seconds_stale": round(max(stale, default=0.0), 3),
    }


async def run_w2(nats_url: str, admin_url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """W2: saturation with one and two gates, p99 at half the rate, the raw publish floor, projection lag."""
    results: dict[str, Any] = {}
    for gates in (1, 2):
        install = await Installation.create(nats_url, admin_url)
        nc = await admin_connect(nats_url)
        services = ServiceProcesses(install.settings)
        await services.start(*["policy_gate"] * gates)
        client = DecisionClient(nc, install.settings.subject_prefix, "warden")
        await client.open()
        await _ready(client)
        cpu = CpuMeter()
        cpu.start()
        rate, latencies = await closed_loop(client, concurrency, seconds)
        cpu_seconds = cpu.stop()
        half = await open_loop(client, rate / 2, seconds)
        results[f"gates_{gates}"] = {
            "decisions_per_second": round(rate),
            # Where saturation's CPU went, per decision: the gate(s), the load generator, NATS.
            "cpu_us_per_decision": {role: round(spent / len(latencies) * 1e6) for role, spent in cpu_seconds.items()},
            "saturation_latency": latency_summary(latencies),
            "p99_ms_at_half_rate": latency_summary(half)["p99_ms"],
            "gate_resident_mb": services.resident_mb(),
        }
        await services.stop()
        await nc.close()

    # Projection lag: one gate at saturation with the projector writing everything to Postgres.
    install = await Installation.create(nats_url, admin_url)
    nc = await admin_connect(nats_url)
    await _relay_stream(nc, install.settings.subject_prefix)
    # The floor at the workload's own depth: 128 requesters keep at most 128 requests and 128
    # decisions unacknowledged, so 256 publishes in flight. With fsync on every write, nats-server
    # syncs what is waiting together, so a deeper pipeline stores more per second: reported too.
    results["raw_publish_per_second"] = round(
        await raw_publish_rate(nc, install.settings.subject_prefix, seconds, window=2 * concurrency)
    )
    results["raw_publish_per_second_window_1024"] = round(
        await raw_publish_rate(nc, install.settings.subject_prefix, seconds, window=1024)
    )
    services = ServiceProcesses(install.settings)
    await services.start("policy_gate", "audit_projector")
    client = DecisionClient(nc, install.settings.subject_prefix, "warden")
    await client.open()
    await _ready(client)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_projection_lag(install, stop))
    rate, _ = await closed_loop(client, concurrency, seconds)
    stop.set()
    results["with_projector"] = {"decisions_per_second": round(rate), "lag": await sampler}
    await services.stop()
    await nc.close()

    best = max(results["gates_1"]["decisions_per_second"], results["gates_2"]["decisions_per_second"])
    results["persisted_messages_per_decision"] = PERSISTED_PER_DECISION
    results["raw_publish_floor_decisions_per_second"] = round(
        results["raw_publish_per_second"] / PERSISTED_PER_DECISION
    )
    results["best_to_floor"] = round(best / results["raw_publish_floor_decisions_per_second"], 2)
    return results
