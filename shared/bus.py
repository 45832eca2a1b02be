"""Publishing envelopes to JetStream: the headers every Warden message carries, in one place."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
import tenacity
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.messages import Envelope
from shared.telemetry import inject_trace_context

log = structlog.get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
TYPE_HEADER = "Warden-Type"
# How a long-lived service connects: it never gives up reconnecting (a cluster's leader election
# or a restarted node is waited out, not a reason to exit), and tries again promptly.
SERVICE_CONNECT_OPTIONS: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}


# Idle heartbeats of an ordered consumer, in seconds. nats-py re-creates one that missed two, so
# this bounds how long a consumer lost with its node (an ephemeral consumer has one replica) goes
# unnoticed: with nats-py's default of 5 s, a leader kill left the scheduler blind for 10 s or more.
ORDERED_HEARTBEAT_SECONDS = 1.0


def server_urls(url: str) -> list[str]:
    """The servers a NATS URL setting names: one URL, or a cluster's seed nodes separated by commas.

    nats-py takes the list and connects to whichever answers, so a client or service starts
    while one seed node is down.
    """
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


async def connect(url: str, **options: Any) -> NatsClient:
    """A nats-py connection to the servers `url` names (see `server_urls`)."""
    return await nats.connect(server_urls(url), **options)


def command_key_scope(tenant: str, type_name: str) -> str:
    """What every command's Nats-Msg-Id starts with (see `envelope_headers`)."""
    return f"{tenant}:{type_name}:"


def envelope_headers(
    envelope: Envelope[Any], idempotency_key: str | None = None, *, start_trace: bool = False
) -> dict[str, str]:
    """Headers for one message: JetStream's dedup key, the type (for routing without parsing), trace context.

    The idempotency key defaults to the envelope id, so a retried publish of the same envelope is
    stored once; clients pass their own key to make a retried *request* idempotent too. JetStream
    deduplicates over the whole stream, so a command's key is scoped by its tenant and type
    (`acme:run.submitted:ticket-42`): two tenants using the same key never collide, and the gate
    refuses a command whose key claims another tenant's scope.
    """
    key = idempotency_key or envelope.id
    if envelope.data.KIND == "command":
        key = command_key_scope(envelope.tenant, envelope.type) + key
    headers = {
        MSG_ID_HEADER: key,
        TYPE_HEADER: envelope.type,
        "content-type": "application/json",
    }
    return inject_trace_context(headers, start_trace=start_trace)


# How long to wait for the server's answer when taking what else is already waiting.
_DRAIN_SECONDS = 0.005


# Bus failures that pass: no server answering for a stream (a leader election in a cluster, a node
# restarting), a request timing out, a connection being re-established. Anything else (a stream
# that does not exist, a refused request) is not retried.
_TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
)
# How long one operation is retried before its caller gets the error: past a cluster's leader
# election (seen here: 7 to 12 seconds), with room to spare.
TRANSIENT_DEADLINE_SECONDS = 60.0

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether a bus error may pass if the same operation is tried again."""
    return isinstance(exc, _TRANSIENT)


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
