"""An ordered read of one filter subject of a stream, through consumers a tenant's permissions can pin.

nats-py's ordered consumer asks the server for an unnamed consumer (`$JS.API.CONSUMER.CREATE.<stream>`),
a request whose filter no permission can see. This reader names each consumer (at random, so no
one can guess it) and sends its filter in the request's subject,
`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`: the server checks that the filter in the
request is that one, so a permission on the subject holds a tenant's client to its own events
(see `warden.permissions.tenant_permissions`).

Otherwise it behaves as nats-py's ordered consumer: ephemeral, unacknowledged, flow-controlled,
and re-created from the next stream sequence, under a new name, whenever a message is missed or
heartbeats stop. The consumer left behind expires on its own.
"""

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from warden.consumers import ORDERED_HEARTBEAT_SECONDS

STATUS_HEADER = "Status"
LAST_CONSUMER_SEQ_HEADER = "Nats-Last-Consumer"
# A consumer whose reader has gone is removed by the server after this long.
INACTIVE_THRESHOLD_SECONDS = 30.0


class FilteredReader:
    """Delivers the messages of `stream` matching `filter_subject` to `callback`, in stream order, once each."""

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        filter_subject: str,
        callback: Callable[[Msg], Awaitable[None]],
        *,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        start_seq: int | None = None,
        start_time: datetime | None = None,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stream = stream
        self.filter_subject = filter_subject
        self.callback = callback
        self.deliver_policy = deliver_policy
        self.start_seq = start_seq
        self.start_time = start_time  # with DeliverPolicy.BY_START_TIME: the first message stored at or after it
        self.next_stream_seq: int | None = None  # once a message has arrived: where to go on from
        # What the first consumer had to deliver when it was made: 0 means nothing is stored yet.
        self.pending_at_start: int | None = None
        self.consumer_seq = 0
        self.generation = 0
        self.subscription: Subscription | None = None
        self.last_heard = 0.0
        self.watchdog: asyncio.Task[None] | None = None
        self.restarting: asyncio.Lock = asyncio.Lock()

    async def start(self) -> "FilteredReader":
        await self._create()
        self.watchdog = asyncio.create_task(self._watch())
        return self

    def _config(self, name: str, inbox: str) -> ConsumerConfig:
        if self.next_stream_seq is not None:
            policy, start = DeliverPolicy.BY_START_SEQUENCE, self.next_stream_seq
        elif self.start_seq is not None:
            policy, start = DeliverPolicy.BY_START_SEQUENCE, self.start_seq
        else:
            policy, start = self.deliver_policy, None
        return ConsumerConfig(
            name=name,
            filter_subject=self.filter_subject,
            deliver_subject=inbox,
            deliver_policy=policy,
            opt_start_seq=start,
            opt_start_time=self.start_time if policy is DeliverPolicy.BY_START_TIME else None,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=ORDERED_HEARTBEAT_SECONDS,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=INACTIVE_THRESHOLD_SECONDS,
        )

    async def _create(self) -> None:
        self.generation += 1
        generation = self.generation
        inbox = self.nc.new_inbox()

        async def deliver(message: Msg) -> None:
            if generation == self.generation:  # not a straggler from a consumer replaced since
                await self._on_message(message)

        subscription = await self.nc.subscribe(inbox, cb=deliver)
        try:
            info = await self.js.add_consumer(self.stream, self._config(f"reader_{secrets.token_hex(12)}", inbox))
        except BaseException:
            await subscription.unsubscribe()
            raise
        previous, self.subscription = self.subscription, subscription
        if self.pending_at_start is None:
            self.pending_at_start = info.num_pending
        self.consumer_seq = 0
        self.last_heard = asyncio.get_running_loop().time()
        if previous is not None:
            with contextlib.suppress(nats.errors.Error):
                await previous.unsubscribe()

    async def _on_message(self, message: Msg) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        headers = message.headers or {}
        if headers.get(STATUS_HEADER) == "100":  # an idle heartbeat, or flow control asking for an answer
            if message.reply:
                await self.nc.publish(message.reply)
            last = headers.get(LAST_CONSUMER_SEQ_HEADER)
            if last is not None and int(last) > self.consumer_seq:
                await self._restart()  # the heartbeat says messages were sent that never arrived
            return
        sequence = message.metadata.sequence
        if sequence.consumer != self.consumer_seq + 1:
            await self._restart()
            return
        self.consumer_seq = sequence.consumer
        self.next_stream_seq = sequence.stream + 1
        await self.callback(message)

    async def _restart(self) -> None:
        if self.restarting.locked():
            return
        async with self.restarting:
            self.generation += 1  # stop taking messages from the consumer being replaced
            with contextlib.suppress(nats.errors.Error, TimeoutError):  # the watchdog tries again
                await self._create()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(ORDERED_HEARTBEAT_SECONDS)
            if asyncio.get_running_loop().time() - self.last_heard > 2 * ORDERED_HEARTBEAT_SECONDS:
                await self._restart()

    async def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watchdog
        self.generation += 1
        if self.subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.subscription.unsubscribe()


# A read that hears nothing for this long while messages are still pending has stalled.
READ_STALL_SECONDS = 30.0


async def read_stored(
    nc: NatsClient,
    stream: str,
    filter_subject: str,
    sink: Callable[[int, bytes], None],
    *,
    since: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    what: str = "messages",
) -> int:
    """Hand every message stored now on `filter_subject` (from `since` on, if given) to `sink` in stream
    order, as its stream sequence and bytes. Returns how many were read.

    `progress(read, total)` is called once the total is known (read 0), now and then on a long
    read, and at the end; a read that stops hearing from the server while messages are pending
    raises TimeoutError (naming `what`).
    """
    done = asyncio.Event()
    total = 0
    read = 0

    async def collect(message: Msg) -> None:
        nonlocal read
        metadata = message.metadata
        sink(metadata.sequence.stream, message.data)
        read += 1
        if progress is not None and read % 10_000 == 0:
            progress(read, total)
        if metadata.num_pending == 0:
            done.set()

    reader = FilteredReader(
        nc,
        stream,
        filter_subject,
        collect,
        deliver_policy=DeliverPolicy.BY_START_TIME if since is not None else DeliverPolicy.ALL,
        start_time=since,
    )
    await reader.start()
    try:
        total = reader.pending_at_start or 0
        if progress is not None:
            progress(read, total)
        while total and not done.is_set():
            before = read
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), READ_STALL_SECONDS)
            if not done.is_set() and read == before:
                raise TimeoutError(f"reading the {what} stalled after {before} of {total}")
    finally:
        await reader.stop()
    if progress is not None:
        progress(read, total)
    return read
