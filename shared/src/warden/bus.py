"""What the services need on top of `warden.wire`: trace context on publish, retries, fetching, heartbeats.

The services consume JetStream through nats-py here (`fetch_batch`, `heartbeat`) rather than
through FastStream's subscribers, on purpose: `python -m bench.faststream_consumers` measured
FastStream 0.7.8's JetStream subscribers, acking after the work as Warden must, at 10 to 15 times
the CPU per message of this loop (307 to 480 µs against 31 µs; 0.07 to 0.12 of its throughput;
bench/results/faststream_consumers.json), and its cheapest form, which cannot ack after the work,
at 3.6 times. Its pull loop also stops on nats-py 2.16's builtin TimeoutError (its supervisor
restarts it), and cannot fetch only as many messages as a runner has free slots.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
import tenacity
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from warden.messages import Envelope
from warden.telemetry import inject_trace_context
from warden.wire import is_transient, message_headers

log = structlog.get_logger(__name__)


def envelope_headers(
    envelope: Envelope[Any], idempotency_key: str | None = None, *, start_trace: bool = False
) -> dict[str, str]:
    """`message_headers` (dedup key, type) plus the current trace context; see `inject_trace_context`."""
    return inject_trace_context(message_headers(envelope, idempotency_key), start_trace=start_trace)


# How long to wait for the server's answer when taking what else is already waiting.
_DRAIN_SECONDS = 0.005


# How long one operation is retried before its caller gets the error: past a cluster's leader
# election (seen here: 7 to 12 seconds), with room to spare.
TRANSIENT_DEADLINE_SECONDS = 60.0

T = TypeVar("T")


async def retry_transient(operation: Callable[[], Awaitable[T]], *, what: str, deadline: float | None = None) -> T:
    """Run `operation`, trying again with backoff while it fails transiently, for up to `deadline` seconds
    (TRANSIENT_DEADLINE_SECONDS by default).

    For operations that are safe to repeat: keyed publishes (stored once), reads, consumer set-up.
    The first try is a plain await: setting up retries costs about 35 µs, which the common case
    (a healthy bus, on every publish of every run) should not pay.
    """
    try:
        return await operation()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("bus unavailable; trying again", what=what, attempt=1, error=repr(exc))

    def note(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("bus unavailable; trying again", what=what, attempt=state.attempt_number + 1, error=repr(error))

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=2.0),
        stop=tenacity.stop_after_delay(TRANSIENT_DEADLINE_SECONDS if deadline is None else deadline),
        before_sleep=note,
        reraise=True,
    )

    async def attempt() -> T:
        # A coroutine function of our own: tenacity runs any other callable as a synchronous one.
        return await operation()

    return await retrying(attempt)


async def is_stored(js: JetStreamContext, stream: str, subject: str) -> bool:
    """Whether `stream` holds a message on `subject` (a run's run.started, say); passing bus failures waited out."""
    try:
        await retry_transient(lambda: js.get_last_msg(stream, subject, direct=True), what=f"a message on {subject}")
    except nats.js.errors.NotFoundError:
        return False
    return True


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
