"""How Warden's services consume JetStream: the one adapter between them and nats-py's consumers.

Consumption on the hot paths is hand-written on nats-py on purpose, not FastStream's subscribers
(each service is still a FastStream application: its lifespan, connection and shutdown, and the
subscribers and publishers it declares, `warden.channels`, which FastStream's AsyncAPI document
describes; the hot paths' subscribers have no handler, so FastStream consumes nothing there). One
low-rate consumer, the audit projector's advisories (one message for each message a consumer gives
up on), is a FastStream subscriber instead: `warden.audit_projector.advisories` says why its cost
does not matter, and which of the pull loop's faults below it avoids and which it lives with.
`python -m bench.faststream_consumers` (bench/results/faststream_consumers.json: FastStream 0.7.8,
fast-depends 3.0.9, nats-py 2.16.0, anyio 4.16.0; 20,000 stored 300-byte messages, explicit acks)
measured, in CPU per message against this module's pull loop (`fetch_batch`, 31.1 µs):

- FastStream push with MANUAL ack: 399.3 µs, 12.84 times (0.09 of its throughput);
- FastStream pull (PullSub) with MANUAL ack: 306.8 µs, 10.15 times (0.12 of its throughput);
- FastStream push with `max_workers=16`: 479.7 µs, 15.42 times (0.07 of its throughput);
- FastStream push with NACK_ON_ERROR, body only: 110.8 µs, 3.59 times; and that form acks when the
  handler returns, which no Warden consumer can use (each decides its own ack, below).

FastStream 0.7.8's pull loop also misbehaves: nats-py 2.16's `fetch` can raise the builtin
`asyncio.TimeoutError` on an empty stream, which that loop (`_consume_pull`) does not catch, so its
task ends and FastStream's supervisor restarts it (the same benchmark's idle check, with that
timeout forced: three loop tasks ended, four tasks by the end); `fetch_batch` takes it for "nothing
yet". When the consumer does not answer (deleted, or no leader during an election) that loop asks
again at once, thousands of times a second, where `fetch_batch` pauses. And its pull subscriber
cannot fetch only as many messages as a runner has free slots.

What is here: `fetch_batch` (the pull loop's fetch), `heartbeat` (in-progress acks while working),
`terminate` (give a message up, telling the server why), `watch_ground` (exit when the consumer or
stream read from is gone, the advisories subscriber's too), `ordered_subscription` (an ordered
consumer), and the durable set-ups the services repeat: `durable_pull` (the projector's audit
consumers, the runner's work consumer), `set_up_durable` (the same set-up without the
subscription: the projector's advisories consumer, which FastStream then binds to) and
`shared_push` (the gates' command consumer). Each service chooses its ack policy at its call site:

- the policy gate acks a command once its answer is stored, naks it with a growing delay when
  storing fails, and after MAX_DELIVERIES terminates it with a reason (`terminate`), which the
  server's terminated advisory turns into a dead letter;
- the agent runner acks a work item when its run ends (with `heartbeat` meanwhile), naks it to
  resume later when the bus fails mid-run, and records an invalid one as a dead letter before
  terminating it (`warden.dead_letters.give_up`);
- the audit projector acks a batch's last message (AckPolicy.ALL) only after the database
  transaction holding its rows and position commits, and never gives a message up;
- ordered consumers (the scheduler's fold, a run's history, the decision feed, the cancels and
  halts in force) are not acknowledged at all.

Two other read paths stay apart, each for its own reason. `warden.reader.FilteredReader` is the
client's ordered read: it names its consumers and sends its filter in the request subject, so a
tenant's permissions can pin it to that tenant's events, which nats-py's ordered consumer cannot.
The audit projector's replay reads through `warden.audit_projector.stream_reader`, a bare
connection that pulls and parses in bulk, measured by `python -m bench.replay`
(bench/results/replay.json) at 2.58 times nats-py's speed.

Needs only nats-py (the client imports `ordered_subscription` and ORDERED_HEARTBEAT_SECONDS): it
logs through structlog where it is installed (every service), with the same events and fields as
before (tests/test_ground.py reads the `lost` field), and through the standard `logging` module,
fields as text, in a client-only install. Retries (`warden.bus.retry_transient`) are its callers'
to add.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT

from warden.wire import is_transient


class _FieldsAsText(logging.LoggerAdapter[logging.Logger]):
    """Standard logging called as structlog is (`log.warning(event, key=value)`), the fields as text."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return " ".join([str(msg), *(f"{key}={value}" for key, value in kwargs.items())]), {}


log: Any
try:
    import structlog
except ModuleNotFoundError:  # a client-only install: nothing it runs from here logs, but nothing breaks if it does
    log = _FieldsAsText(logging.getLogger(__name__))
else:
    log = structlog.get_logger(__name__)

# Idle heartbeats of an ordered consumer, in seconds. nats-py re-creates one that missed two, so
# this bounds how long a consumer lost with its node (an ephemeral consumer has one replica) goes
# unnoticed: with nats-py's default of 5 s, a leader kill left the scheduler blind for 10 s or more.
ORDERED_HEARTBEAT_SECONDS = 1.0


async def ordered_subscription(
    js: JetStreamContext,
    filter_subjects: Sequence[str],
    stream: str,
    callback: Callable[[Msg], Awaitable[None]],
    *,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    start_seq: int | None = None,
) -> JetStreamContext.PushSubscription:
    """An ordered consumer on `stream`: ephemeral, flow-controlled, re-created by nats-py after any
    gap, and noticed lost within two heartbeats (ORDERED_HEARTBEAT_SECONDS). How Warden reads a
    stream in order: the client's tail, the scheduler's fold, a run's history, the decision feed."""
    return await js.subscribe(
        filter_subjects[0],
        stream=stream,
        cb=callback,
        ordered_consumer=True,
        config=ConsumerConfig(
            deliver_policy=deliver_policy,
            opt_start_seq=start_seq,
            idle_heartbeat=ORDERED_HEARTBEAT_SECONDS,
            filter_subjects=list(filter_subjects) if len(filter_subjects) > 1 else None,
        ),
    )


async def durable_pull(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    *,
    existing: Literal["keep", "update", "replace"],
    pending_bytes_limit: int = DEFAULT_JS_SUB_PENDING_BYTES_LIMIT,
) -> JetStreamContext.PullSubscription:
    """A pull subscription bound to the durable consumer `config` names on `stream`, set up first
    (see `set_up_durable`). No retries here: callers wrap this in `warden.bus.retry_transient`."""
    durable = await set_up_durable(js, stream, config, existing=existing)
    return await js.pull_subscribe_bind(durable=durable, stream=stream, pending_bytes_limit=pending_bytes_limit)


async def set_up_durable(
    js: JetStreamContext, stream: str, config: ConsumerConfig, *, existing: Literal["keep", "update", "replace"]
) -> str:
    """Set up the durable consumer `config` names on `stream`, and return its name.

    `existing` says what becomes of a consumer of that name already there: "keep" leaves it as it
    is and adds one only if there is none (the runners' shared work consumer: the first runner
    to start creates it); "update" adds the consumer anyway, which the server accepts when the
    config matches or may be updated to it (the projector's advisories consumer, whose acks say
    what is recorded); "replace" deletes it first (the projector's audit consumer, restarted at
    the position stored in Postgres). Raises `nats.js.errors.NotFoundError` when `stream` does
    not exist. No retries here: callers wrap this in `warden.bus.retry_transient`.
    """
    durable = config.durable_name
    if durable is None:
        raise ValueError("a durable consumer needs a config with a durable_name")
    if existing == "replace":
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, durable)
    add = True
    if existing == "keep":
        try:
            await js.consumer_info(stream, durable)
            add = False
        except nats.js.errors.NotFoundError:
            pass
    if add:
        await js.add_consumer(stream, config)
    return durable


async def shared_push(
    js: JetStreamContext,
    subject: str,
    *,
    stream: str,
    durable: str,
    callback: Callable[[Msg], Awaitable[None]],
    config: ConsumerConfig,
) -> JetStreamContext.PushSubscription:
    """A push subscription to a durable consumer every instance of a service shares through a queue
    group of the same name; each message is acknowledged by `callback`, as it decides.

    JetStream spreads the messages across the instances and redelivers what one leaves
    unacknowledged. No retries here: callers wrap this in `warden.bus.retry_transient`.
    """
    return await js.subscribe(
        subject, queue=durable, durable=durable, stream=stream, cb=callback, manual_ack=True, config=config
    )


# How long to wait for the server's answer when taking what else is already waiting.
_DRAIN_SECONDS = 0.005


async def fetch_batch(subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    """Up to `batch` messages: block up to `wait` seconds for the first, then take what else is waiting.

    nats-py's own multi-message fetch, once it has to long-poll, holds what it got until the batch
    is full or the timeout ends, so a quiet stream stalls every batch; asking for one message,
    then for the rest with a tiny timeout, returns as soon as the stream has nothing more.
    Timeouts mean "nothing yet" (including nats-py 2.16's asyncio.TimeoutError, which FastStream
    0.7.8's pull loop misses), but a cancellation is never swallowed: one that lands inside
    nats-py's own wait_for can surface as a TimeoutError, and a loop that took it for "no
    messages" would never stop.
    """
    messages = await _fetch(subscription, 1, wait)
    if messages and batch > 1:
        messages += await _fetch(subscription, batch - 1, _DRAIN_SECONDS)
    return messages


async def _fetch(subscription: JetStreamContext.PullSubscription, batch: int, wait: float) -> list[Msg]:
    try:
        return await subscription.fetch(batch, timeout=wait)
    except (TimeoutError, nats.errors.TimeoutError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return []
    except nats.errors.Error as exc:
        if not is_transient(exc):
            raise
        # The consumer's stream has no leader for now (an election), or the connection is
        # being re-established: nothing to fetch yet, and a pause before asking again.
        log.warning("nothing can be fetched for now", error=repr(exc))
        await asyncio.sleep(min(wait, 1.0) if wait > 0 else 0.5)
        return []


async def heartbeat(message: Msg, every: float) -> None:
    """Tell JetStream the message is still being worked on, so it is not delivered again meanwhile."""
    while True:
        await asyncio.sleep(every)
        try:
            await message.in_progress()
        except nats.errors.Error as exc:
            log.warning("heartbeat failed", error=repr(exc))


# The most of a termination's reason the server is told (it goes into its advisory, and from there
# into the dead letter).
MAX_TERM_REASON_CHARS = 1000


async def terminate(message: Msg, reason: str) -> None:
    """Give up on a JetStream message for good, telling the server why.

    The server puts the reason in its terminated advisory, from which the audit projector records
    the dead letter. nats-py 2.16's `term()` sends no reason; the protocol takes one after `+TERM`,
    and `respond` is nats-py's public way to publish on a message's reply (its ack) subject (the
    server reads an acknowledgement's body, not the headers `respond` copies onto it).
    """
    text = " ".join(reason.split())[:MAX_TERM_REASON_CHARS] or "no reason given"
    await message.respond(b"+TERM " + text.encode())


# How often a service checks that the consumer (and stream) it reads from still exist, and how
# many checks in a row must find it gone: a cluster electing a stream's leader (7 to 12 s here)
# can answer "not found" for a while, and that is no reason to exit.
GROUND_CHECK_SECONDS = 5.0
GROUND_LOST_AFTER_CHECKS = 4


class GroundLost(Exception):
    """The consumer, or the stream, a service reads from is gone."""


async def watch_ground(
    check: Callable[[], Awaitable[object]],
    what: str,
    every: float = GROUND_CHECK_SECONDS,
    lost_after: int = GROUND_LOST_AFTER_CHECKS,
) -> None:
    """Return never; raise `GroundLost` once `check` (a consumer or stream lookup) finds `what` gone
    `lost_after` times in a row.

    A consumer deleted under a push subscription just stops delivering, and nothing in nats-py
    says so: a service runs this beside its loop, and on `GroundLost` exits for its supervisor to
    start it again, which re-creates its consumer (or says loudly that its stream is missing).
    A bus that does not answer for now is not a lost consumer: the check is tried again.
    """
    missing = 0
    while True:
        await asyncio.sleep(every)
        try:
            await check()
            missing = 0
        except nats.js.errors.NotFoundError as exc:
            missing += 1
            if missing >= lost_after:
                log.error("what this service reads from is gone; exiting to be restarted", lost=what, error=repr(exc))
                raise GroundLost(f"{what} is gone: {exc}") from exc
            log.warning("what this service reads from is not found", what=what, checks=missing)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not check what this service reads from", what=what, error=repr(exc))
