"""What the services need on top of `warden.wire`: trace context on publish, retries.

How they consume JetStream (fetching, heartbeats, terminating, watching their consumers) is
`warden.consumers`.
"""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import structlog
import tenacity
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
