"""FastStream 0.7.8's own JetStream subscribers against Warden's hand-written pull loop: throughput and CPU.

    uv run python -m bench.faststream_consumers [--messages 20000] [--rounds 3]

Starts an embedded NATS (fsync always, as Warden runs it) in a temporary directory unless
WARDEN_NATS_URL is set. Each variant consumes the same N pre-stored ~300-byte JSON messages from
a durable consumer with explicit acks (max_ack_pending 2048, ack_wait 30 s, as the gate's), from a
stream and subjects of its own (uuid-named, file storage, deleted afterwards). The handler does the
same work everywhere: the message's JSON parsed into a dict, one field read, the message acked.

1. hand-written: nats-py `pull_subscribe` and `warden.consumers.fetch_batch(batch=256, wait=1.0)`, each
   message parsed (`json.loads`), handled and acked (`await msg.ack()`) in turn, in one task.
2. FastStream push: `broker.subscriber(subject, stream=JStream(declare=False), durable=..., queue=...,
   ack_policy=AckPolicy.MANUAL)`; FastStream's decoder parses the JSON into the handler's `dict`
   argument and the handler acks through its `message: NatsMessage` argument. nats-py calls a push
   subscription's callback one message at a time, so the handler runs sequentially.
   2b. The same with `ack_policy=AckPolicy.NACK_ON_ERROR` and a handler taking the body alone
   (FastStream acks when it returns): a control that isolates what the `message` argument costs
   (fast_depends resolves FastStream's `Context` arguments in a worker thread, once per message).
3. FastStream pull: variant 2 with `pull_sub=PullSub(batch_size=256, timeout=1.0)`: FastStream
   fetches 256 and runs the handler on each in its own task (an anyio task group per batch).
4. FastStream push with `max_workers=16`: FastStream's concurrent subscriber (an in-memory queue
   and up to 16 handlers at once).

Brokers are built as Warden's services build theirs (`warden.service.consumer_service`: per-message
logs at DEBUG, the same reconnect options). The variants run interleaved, `--rounds` times over,
in a rotated order; each figure is the median over rounds, and each ratio the median of the
per-round ratios to variant 1. Timed from the subscription's creation (connections are open
already) to the last message handled; CPU is this process's (`time.process_time`), the
nats-server's alongside when it is the embedded one.

The idle check (the known problem of nats-py 2.16 and FastStream 0.7.8): nats-py's `fetch` can
raise the builtin `asyncio.TimeoutError` when nothing arrives (`_fetch_n`, when the server's 408
is read before nats-py's own timer has fired), where FastStream's pull loop (`_consume_pull`)
suppresses only `nats.errors.TimeoutError`. First nats-py alone: fetches on an empty stream, with
the event loop quiet and busy (a task spinning the CPU 20 ms of every 30 ms, as a service's own
work would), and the exception each raises. Then each variant's consumer starts on an empty
stream, stays idle for three pull timeouts, and 100 messages are published: are all 100 handled
within 10 s? Under three conditions: a quiet event loop, a busy one, and (pull loops only) every
empty fetch made to raise the builtin TimeoutError, as nats-py's does when it loses that race.
FastStream's log (its task supervisor reports a loop task that ended) and its pull subscriber's
task list (one task more per restart) say what happened to the loop meanwhile.

Prints a table and writes bench/results/faststream_consumers.json.
"""

import argparse
import asyncio
import collections
import importlib.metadata
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import nats.errors
import psutil
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as ConsumerAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck, StorageType, StreamConfig

from bench.common import BenchServers, admin_broker_options, admin_connect
from warden.consumers import fetch_batch
from warden.wire import MSG_ID_HEADER, SERVICE_CONNECT_OPTIONS, TYPE_HEADER, server_urls

RESULTS = Path(__file__).parent / "results"
Variant = Literal[
    "hand_written", "faststream_push", "faststream_push_auto_ack", "faststream_pull", "faststream_push_workers16"
]
VARIANTS: tuple[Variant, ...] = (
    "hand_written",
    "faststream_push",
    "faststream_push_auto_ack",
    "faststream_pull",
    "faststream_push_workers16",
)
LABELS: dict[Variant, str] = {
    "hand_written": "1. hand-written pull loop (fetch_batch)",
    "faststream_push": "2. FastStream push, MANUAL ack",
    "faststream_push_auto_ack": "2b. FastStream push, NACK_ON_ERROR, body only",
    "faststream_pull": "3. FastStream pull (PullSub), MANUAL ack",
    "faststream_push_workers16": "4. FastStream push, MANUAL, max_workers=16",
}
# The idle check runs the variants the question is about (2b consumes as 2 does).
IDLE_VARIANTS: tuple[Variant, ...] = ("faststream_pull", "faststream_push", "faststream_push_workers16", "hand_written")
PULL_VARIANTS: tuple[Variant, ...] = ("faststream_pull", "hand_written")
Condition = Literal["quiet", "busy", "forced_builtin_timeout"]
BATCH = 256
PULL_TIMEOUT = 1.0
WORKERS = 16
# The gate's consumer settings (services/policy_gate/.../app.py).
MAX_ACK_PENDING = 2048
ACK_WAIT_SECONDS = 30.0
MAX_DELIVER = 5
PUBLISH_WINDOW = 256
MESSAGE_BYTES = 300
IDLE_MESSAGES = 100
IDLE_WAIT = 3 * PULL_TIMEOUT
IDLE_DEADLINE = 10.0
RUN_DEADLINE = 300.0
PROBE_FETCHES = {"quiet": 8, "busy": 24}
# A busy event loop: this much CPU work at a time, then this long idle (two thirds busy).
BUSY_SLICE = 0.020
BUSY_GAP = 0.010


# --------------------------------------------------------------------------------------------
# Streams, messages and the work every handler does
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A stream of one variant's own: its name, the subject its messages are on, its durable."""

    stream: str
    subject: str
    durable: str

    @classmethod
    async def create(cls, nc: NatsClient) -> "Target":
        token = uuid.uuid4().hex[:12]
        target = cls(stream=f"BENCH_FS_{token}", subject=f"benchfs{token}.tick", durable=f"bench_fs_{token}")
        await nc.jetstream().add_stream(
            StreamConfig(
                name=target.stream,
                subjects=[f"benchfs{token}.>"],
                storage=StorageType.FILE,
                num_replicas=1,
                description="bench.faststream_consumers",
            )
        )
        return target

    async def delete(self, nc: NatsClient) -> None:
        await nc.jetstream().delete_stream(self.stream)


def consumer_config(durable: str) -> ConsumerConfig:
    """The same durable, explicitly acknowledged consumer for every variant (a fresh object: both
    nats-py and FastStream fill in the one they are given)."""
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=ConsumerAckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_SECONDS,
        max_ack_pending=MAX_ACK_PENDING,
        max_deliver=MAX_DELIVER,
    )


def message_body(seq: int) -> bytes:
    """A ~300-byte JSON document shaped like a Warden envelope."""
    document: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "type": "step.completed",
        "tenant": "acme",
        "subject": f"run-{seq // 100}",
        "actor": "runner",
        "source": "bench",
        "time": "2025-01-01T00:00:00.000000Z",
        "seq": seq,
        "data": {"step": seq % 100, "kind": "model_turn", "summary": ""},
    }
    short = len(json.dumps(document).encode())
    document["data"]["summary"] = "x" * max(0, MESSAGE_BYTES - short)
    return json.dumps(document).encode()


async def publish(nc: NatsClient, subject: str, count: int) -> None:
    """Store `count` messages on `subject`: acknowledged publishes, PUBLISH_WINDOW of them in flight."""
    js = nc.jetstream()
    in_flight: collections.deque[asyncio.Future[PubAck]] = collections.deque()
    for seq in range(count):
        if len(in_flight) >= PUBLISH_WINDOW:
            await in_flight.popleft()
        headers = {MSG_ID_HEADER: f"bench-{seq}", TYPE_HEADER: "step.completed", "content-type": "application/json"}
        in_flight.append(await js.publish_async(subject, message_body(seq), headers=headers))
    await asyncio.gather(*in_flight)


@dataclass
class Tally:
    """What the handlers have done: every variant's handler calls `handled` once per message."""

    expected: int
    count: int = 0
    checksum: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def handled(self, document: dict[str, Any]) -> None:
        self.checksum += document["seq"]
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


class BuiltinTimeouts:
    """Stands in for a pull subscription (set `subscription` first) whose empty fetches raise the
    builtin TimeoutError, as nats-py 2.16's `fetch` does when it reads the server's 408 before its
    own timer fires."""

    def __init__(self) -> None:
        self.subscription: JetStreamContext.PullSubscription | None = None
        self.raised = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.subscription, name)

    async def fetch(
        self,
        batch: int = 1,
        timeout: float | None = 5,  # noqa: ASYNC109 - nats-py's own signature, which its callers use
        heartbeat: float | None = None,
    ) -> list[Msg]:
        assert self.subscription is not None
        try:
            return await self.subscription.fetch(batch, timeout, heartbeat)
        except nats.errors.TimeoutError:
            self.raised += 1
            raise TimeoutError("nats-py's builtin timeout, forced") from None


def spin(seconds: float) -> None:
    """Keep the CPU, and so the event loop, busy for `seconds`, as a service's own work would."""
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        continue


async def busy_event_loop() -> None:
    while True:
        spin(BUSY_SLICE)
        await asyncio.sleep(BUSY_GAP)


# --------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------


async def hand_written(nc: NatsClient, target: Target, tally: Tally, *, forced: BuiltinTimeouts | None = None) -> None:
    """Variant 1: Warden's pull loop (as the runner and the projector run it), one message at a time."""
    subscription = await nc.jetstream().pull_subscribe(
        target.subject, durable=target.durable, stream=target.stream, config=consumer_config(target.durable)
    )
    fetching = subscription
    if forced is not None:
        forced.subscription = subscription
        fetching = cast(JetStreamContext.PullSubscription, forced)
    try:
        while not tally.done.is_set():
            for message in await fetch_batch(fetching, BATCH, PULL_TIMEOUT):
                tally.handled(json.loads(message.data))
                await message.ack()
    finally:
        await subscription.unsubscribe()


def register(broker: NatsBroker, variant: Variant, target: Target, tally: Tally) -> Any:
    """Variants 2 to 4: one subscriber on `broker`, its handler parsing (FastStream's decoder) and acking."""

    async def handle(body: dict[str, Any], message: NatsMessage) -> None:
        tally.handled(body)
        await message.ack()

    async def handle_body(body: dict[str, Any]) -> None:
        tally.handled(body)  # FastStream acks once this returns (NACK_ON_ERROR: naks if it raises)

    # What differs between the variants; everything else is the same subscription.
    options: dict[str, dict[str, Any]] = {
        "faststream_push": {"queue": target.durable, "ack_policy": AckPolicy.MANUAL},
        "faststream_push_auto_ack": {"queue": target.durable, "ack_policy": AckPolicy.NACK_ON_ERROR},
        "faststream_pull": {
            "pull_sub": PullSub(batch_size=BATCH, timeout=PULL_TIMEOUT),
            "ack_policy": AckPolicy.MANUAL,
        },
        "faststream_push_workers16": {
            "queue": target.durable,
            "ack_policy": AckPolicy.MANUAL,
            "max_workers": WORKERS,
        },
    }
    if variant not in options:
        raise ValueError(variant)
    subscriber: Any = broker.subscriber(
        target.subject,
        stream=JStream(name=target.stream, declare=False),
        durable=target.durable,
        config=consumer_config(target.durable),
        **options[variant],
    )
    if variant == "faststream_push_auto_ack":
        subscriber(handle_body)
        return subscriber
    subscriber(handle)
    return subscriber


class Consumer:
    """One variant's consumer on one target: prepared, started and stopped the same way for every variant."""

    def __init__(
        self,
        nats_url: str,
        variant: Variant,
        target: Target,
        tally: Tally,
        logger: logging.Logger,
        *,
        forced: BuiltinTimeouts | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.variant = variant
        self.target = target
        self.tally = tally
        self.logger = logger
        self.forced = forced
        self.nc: NatsClient | None = None
        self.loop: asyncio.Task[None] | None = None
        self.broker: NatsBroker | None = None
        self.subscriber: Any = None
        self.warnings: list[str] = []

    async def prepare(self) -> None:
        """Open the connection and declare the subscriber (not timed)."""
        if self.variant == "hand_written":
            self.nc = await admin_connect(self.nats_url, **SERVICE_CONNECT_OPTIONS)
            return
        # As warden.service.consumer_service builds a service's broker.
        self.broker = NatsBroker(
            server_urls(self.nats_url),
            logger=self.logger,
            log_level=logging.DEBUG,
            **SERVICE_CONNECT_OPTIONS,
            **admin_broker_options(self.nats_url),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.subscriber = register(self.broker, self.variant, self.target, self.tally)
        self.warnings = [f"{warning.category.__name__}: {warning.message}" for warning in caught]
        await self.broker.connect()

    async def start(self) -> None:
        """Create the consumer and start consuming (timed)."""
        if self.nc is not None:
            self.loop = asyncio.create_task(hand_written(self.nc, self.target, self.tally, forced=self.forced))
        elif self.broker is not None:
            await self.broker.start()
            if self.forced is not None:
                # FastStream's pull loop reads `self.subscription.fetch` on every pass.
                self.forced.subscription = self.subscriber.subscription
                self.subscriber.subscription = self.forced

    def loop_tasks(self) -> int | None:
        """The tasks FastStream's subscriber has started (a pull loop: one more after each death)."""
        tasks = getattr(self.subscriber, "tasks", None)
        return None if tasks is None else len(tasks)

    def failed(self) -> BaseException | None:
        if self.loop is not None and self.loop.done() and not self.loop.cancelled():
            return self.loop.exception()
        return None

    async def stop(self) -> None:
        if self.loop is not None:
            if not self.loop.done():
                self.loop.cancel()
            await asyncio.wait([self.loop])
        if self.nc is not None:
            await self.nc.close()
        if self.broker is not None:
            if self.forced is not None:
                self.subscriber.subscription = self.forced.subscription
            await self.broker.stop()


async def wait_handled(consumer: Consumer, deadline: float) -> bool:
    """Wait until the tally is complete (True), the deadline passes or the hand-written loop dies (False)."""
    ends = time.monotonic() + deadline
    while time.monotonic() < ends:
        if consumer.failed() is not None:
            return False
        try:
            await asyncio.wait_for(consumer.tally.done.wait(), min(0.5, max(0.0, ends - time.monotonic())))
            return True
        except TimeoutError:
            continue
    return consumer.tally.done.is_set()


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def process_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def acknowledged(nc: NatsClient, target: Target, count: int, within: float = 5.0) -> bool:
    """Whether the consumer's ack floor reached the last message with nothing left pending."""
    js = nc.jetstream()
    ends = time.monotonic() + within
    while True:
        info = await js.consumer_info(target.stream, target.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if (floor or 0) >= count and not info.num_ack_pending:
            return True
        if time.monotonic() > ends:
            return False
        await asyncio.sleep(0.1)


async def measure(
    nats_url: str, admin: NatsClient, variant: Variant, *, messages: int, server_pid: int | None, logger: logging.Logger
) -> dict[str, Any]:
    """One variant, once: fill a fresh stream, then consume all of it."""
    target = await Target.create(admin)
    try:
        await publish(admin, target.subject, messages)
        tally = Tally(messages)
        consumer = Consumer(nats_url, variant, target, tally, logger)
        await consumer.prepare()
        try:
            server_before, cpu_before = process_cpu(server_pid), time.process_time()
            started = time.perf_counter()
            await consumer.start()
            finished = await wait_handled(consumer, RUN_DEADLINE)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_before
            server_cpu = process_cpu(server_pid) - server_before
            if not finished:
                raise RuntimeError(f"{variant} handled {tally.count} of {messages}: {consumer.failed()!r}")
            acked = await acknowledged(admin, target, messages)
        finally:
            await consumer.stop()
        return {
            "messages_per_second": round(messages / seconds),
            "seconds": round(seconds, 3),
            "cpu_us_per_message": round(cpu / messages * 1e6, 1),
            "nats_server_cpu_us_per_message": round(server_cpu / messages * 1e6, 1) if server_pid else None,
            "all_acked": acked,
            "checksum_ok": tally.checksum == messages * (messages - 1) // 2,
            "subscriber_warnings": consumer.warnings,
        }
    finally:
        await target.delete(admin)


def summarise(rounds: list[dict[Variant, dict[str, Any]]]) -> dict[str, Any]:
    """Medians per variant, and the medians of the per-round ratios to the hand-written loop."""
    summary: dict[str, Any] = {}
    baseline = [each["hand_written"] for each in rounds]
    for variant in VARIANTS:
        runs = [each[variant] for each in rounds]
        servers = [run["nats_server_cpu_us_per_message"] for run in runs]
        rate_ratios = [
            run["messages_per_second"] / base["messages_per_second"] for run, base in zip(runs, baseline, strict=True)
        ]
        cpu_ratios = [
            run["cpu_us_per_message"] / base["cpu_us_per_message"] for run, base in zip(runs, baseline, strict=True)
        ]
        summary[variant] = {
            "label": LABELS[variant],
            "messages_per_second": round(statistics.median(run["messages_per_second"] for run in runs)),
            "cpu_us_per_message": round(statistics.median(run["cpu_us_per_message"] for run in runs), 1),
            "nats_server_cpu_us_per_message": None if None in servers else round(statistics.median(servers), 1),
            "rate_ratio_to_hand_written": round(statistics.median(rate_ratios), 2),
            "cpu_ratio_to_hand_written": round(statistics.median(cpu_ratios), 2),
            "all_acked": all(run["all_acked"] for run in runs),
            "checksum_ok": all(run["checksum_ok"] for run in runs),
            "subscriber_warnings": runs[0]["subscriber_warnings"],
            "rounds": [{key: value for key, value in run.items() if key != "subscriber_warnings"} for run in runs],
        }
    return summary


# --------------------------------------------------------------------------------------------
# The idle check
# --------------------------------------------------------------------------------------------


class Captured(logging.Handler):
    """Keeps FastStream's log records (its broker logs through the logger it is given)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def exception_name(error: BaseException) -> str:
    return f"{type(error).__module__}.{type(error).__qualname__}"


async def probe_nats_py_fetch(nats_url: str, admin: NatsClient) -> dict[str, Any]:
    """nats-py alone: what `fetch(256, timeout=1.0)` (FastStream's call) raises on an empty stream."""
    target = await Target.create(admin)
    nc = await admin_connect(nats_url)
    result: dict[str, Any] = {}
    try:
        subscription = await nc.jetstream().pull_subscribe(
            target.subject, durable=target.durable, stream=target.stream, config=consumer_config(target.durable)
        )
        for condition, fetches in PROBE_FETCHES.items():
            busy = asyncio.create_task(busy_event_loop()) if condition == "busy" else None
            outcomes: collections.Counter[str] = collections.Counter()
            for _ in range(fetches):
                try:
                    got = await subscription.fetch(BATCH, timeout=PULL_TIMEOUT)
                    outcomes[f"returned {len(got)} messages"] += 1
                except TimeoutError as exc:  # nats.errors.TimeoutError is one too
                    outcomes[exception_name(exc)] += 1
            if busy is not None:
                busy.cancel()
                await asyncio.wait([busy])
            result[condition] = {
                "fetches": fetches,
                "outcomes": dict(outcomes),
                "builtin_timeout_errors": outcomes["builtins.TimeoutError"],
            }
        await subscription.unsubscribe()
        return result
    finally:
        await nc.close()
        await target.delete(admin)


async def idle_check(nats_url: str, admin: NatsClient, variant: Variant, condition: Condition) -> dict[str, Any]:
    """Start on an empty stream, stay idle for three pull timeouts, publish 100: all handled within 10 s?"""
    logger = logging.getLogger(f"bench.faststream_consumers.idle.{condition}.{variant}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    captured = Captured()
    logger.addHandler(captured)
    target = await Target.create(admin)
    tally = Tally(IDLE_MESSAGES)
    forced = BuiltinTimeouts() if condition == "forced_builtin_timeout" else None
    consumer = Consumer(nats_url, variant, target, tally, logger, forced=forced)
    busy = asyncio.create_task(busy_event_loop()) if condition == "busy" else None
    try:
        await consumer.prepare()
        await consumer.start()
        tasks_at_start = consumer.loop_tasks()
        await asyncio.sleep(IDLE_WAIT)
        tasks_after_idle = consumer.loop_tasks()
        died_idle = consumer.failed()
        started = time.monotonic()
        await publish(admin, target.subject, IDLE_MESSAGES)
        handled_all = await wait_handled(consumer, IDLE_DEADLINE)
        seconds = time.monotonic() - started
        tasks_at_end = consumer.loop_tasks()
        died = died_idle or consumer.failed()
        records = list(captured.records)  # before stopping: a stop ends the loop tasks too
    finally:
        if busy is not None:
            busy.cancel()
            await asyncio.wait([busy])
        await consumer.stop()
        await target.delete(admin)
        logger.removeHandler(captured)
    errors = [record for record in records if record.levelno >= logging.WARNING]
    return {
        "all_handled": handled_all,
        "handled": tally.count,
        "of": IDLE_MESSAGES,
        "seconds_to_handle": round(seconds, 3) if handled_all else None,
        "builtin_timeouts_forced": forced.raised if forced else None,
        "loop_tasks_at_start": tasks_at_start,
        "loop_tasks_after_idle": tasks_after_idle,
        "loop_tasks_at_end": tasks_at_end,
        "faststream_task_ends_logged": sum("is being executed" in record.getMessage() for record in records),
        "faststream_errors_logged": [record.getMessage().splitlines()[0] for record in errors],
        "exceptions_logged": sorted(
            {exception_name(record.exc_info[1]) for record in errors if record.exc_info and record.exc_info[1]}
        ),
        "hand_written_loop_died": repr(died) if died else None,
    }


async def idle_checks(nats_url: str, admin: NatsClient) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    conditions: tuple[Condition, ...] = ("quiet", "busy", "forced_builtin_timeout")
    for condition in conditions:
        variants = PULL_VARIANTS if condition == "forced_builtin_timeout" else IDLE_VARIANTS
        checks[condition] = {variant: await idle_check(nats_url, admin, variant, condition) for variant in variants}
    return checks


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


async def run(nats_url: str, messages: int, rounds: int, server_pid: int | None) -> dict[str, Any]:
    admin = await admin_connect(nats_url)
    logger = logging.getLogger("bench.faststream_consumers")
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    logger.addHandler(logging.StreamHandler())
    try:
        probe = await probe_nats_py_fetch(nats_url, admin)
        # Idle checks before the throughput runs: FastStream's supervisor logs a given exception
        # once per process, and the first one seen should be the idle checks'.
        idle = await idle_checks(nats_url, admin)
        results: list[dict[Variant, dict[str, Any]]] = []
        for index in range(rounds):
            # A rotated order each round, so no variant always runs first (or last).
            shift = index % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]
            results.append(
                {
                    variant: await measure(
                        nats_url, admin, variant, messages=messages, server_pid=server_pid, logger=logger
                    )
                    for variant in order
                }
            )
    finally:
        await admin.close()
    return {
        "messages": messages,
        "message_bytes": len(message_body(0)),
        "rounds": rounds,
        "batch": BATCH,
        "pull_timeout_seconds": PULL_TIMEOUT,
        "max_workers": WORKERS,
        "versions": {
            name: importlib.metadata.version(name) for name in ("faststream", "fast-depends", "nats-py", "anyio")
        },
        "variants": summarise(results),
        "nats_py_fetch_on_empty_stream": probe,
        "idle_check": idle,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"FastStream {result['versions']['faststream']} subscribers vs Warden's pull loop: "
        f"{result['messages']:,} messages of {result['message_bytes']} bytes, median of {result['rounds']} rounds"
        f" ({result['servers']})",
        f"  {'variant':<46} {'msgs/s':>8} {'CPU µs/msg':>11} {'server µs/msg':>14} {'rate x':>7} {'CPU x':>6}",
    ]
    for variant in VARIANTS:
        row = result["variants"][variant]
        server = row["nats_server_cpu_us_per_message"]
        lines.append(
            f"  {row['label']:<46} {row['messages_per_second']:>8,} {row['cpu_us_per_message']:>11.1f}"
            f" {'-' if server is None else f'{server:.1f}':>14} {row['rate_ratio_to_hand_written']:>7.2f}"
            f" {row['cpu_ratio_to_hand_written']:>6.2f}"
        )
    for condition, probe in result["nats_py_fetch_on_empty_stream"].items():
        lines.append(
            f"  nats-py fetch({BATCH}, timeout={PULL_TIMEOUT}) on an empty stream, {condition} event loop:"
            f" {probe['builtin_timeout_errors']} of {probe['fetches']} raised the builtin TimeoutError"
        )
    lines.append(f"  idle {IDLE_WAIT:.0f} s, then {IDLE_MESSAGES} messages: all handled within {IDLE_DEADLINE:.0f} s?")
    for condition, checks in result["idle_check"].items():
        for variant, check in checks.items():
            notes = []
            if check["loop_tasks_at_start"] is not None:
                notes.append(f"loop tasks {check['loop_tasks_at_start']} -> {check['loop_tasks_at_end']}")
            if check["builtin_timeouts_forced"] is not None:
                notes.append(f"{check['builtin_timeouts_forced']} builtin timeouts forced")
            if check["exceptions_logged"]:
                notes.append(f"logged {', '.join(check['exceptions_logged'])}")
            if check["hand_written_loop_died"]:
                notes.append(f"loop died: {check['hand_written_loop_died']}")
            lines.append(
                f"    {condition:<23} {LABELS[variant]:<46} {check['all_handled']!s:<5}"
                f" ({check['handled']}/{check['of']}) {'; '.join(notes)}"
            )
    return "\n".join(lines)


async def with_servers(body: Callable[[str, int | None], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    external = os.environ.get("WARDEN_NATS_URL")
    if external:
        result = await body(external, None)
        result["servers"] = "external NATS"
        return result
    servers = BenchServers(Path(tempfile.mkdtemp(prefix="warden-bench-faststream-")), sync="always")
    nats_url = await servers.start_nats()
    try:
        process = servers.nodes[0].process
        result = await body(nats_url, process.pid if process else None)
    finally:
        await servers.stop()
    result["servers"] = "embedded NATS, fsync always"
    return result


async def main(messages: int, rounds: int) -> None:
    result = await with_servers(lambda url, pid: run(url, messages, rounds, pid))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faststream_consumers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.rounds))
