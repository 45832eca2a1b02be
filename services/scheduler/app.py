"""The scheduler: turns allowed runs into work, never more at once per tenant than its limit.

On every start it folds the events stream from sequence 1 (only the event types it needs) and
acts only once it has caught up, so a restart neither forgets a queued run nor dispatches one
twice. It must run as a single instance.
"""

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import nats.errors
import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.scheduler.core import WATCHED_TYPES, QueuedRun, SchedulerState, evolve, next_dispatches
from shared.bus import envelope_headers
from shared.errors import InvalidMessage
from shared.messages import MESSAGE_TYPES, Envelope, Payload, RunDispatched, RunQueued, make_envelope, parse_envelope
from shared.service import consumer_service, run_service
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects
from shared.telemetry import consuming

SERVICE = "scheduler"
FETCH_BATCH = 256
# With no new events the scheduler still looks for work this often (a run whose queueing failed).
IDLE_TICK_SECONDS = 0.5
PUBLISH_TIMEOUT_SECONDS = 5.0

log = structlog.get_logger(__name__)


class Scheduler:
    def __init__(self, settings: Settings, broker: NatsBroker) -> None:
        self.settings = settings
        self.broker = broker
        self.subjects = Subjects(settings.subject_prefix)
        self.streams = StreamNames.for_prefix(settings.subject_prefix)
        self.state = SchedulerState()
        self.caught_up = False
        self.last_seq = 0

    @property
    def js(self) -> JetStreamContext:
        js: JetStreamContext = self.broker.config.connection_state.stream
        return js

    async def publish(self, envelope: Envelope[Any], subject: str, stream: str, key: str) -> None:
        await self.broker.publish(
            envelope.to_bytes(),
            subject,
            headers=envelope_headers(envelope, key),
            stream=stream,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    def emit(self, payload: Payload, cause: Envelope[Any]) -> Envelope[Any]:
        return make_envelope(
            payload, tenant=cause.tenant, subject=cause.subject, actor=SERVICE, source=SERVICE, caused_by=cause
        )

    async def queue_allowed(self) -> None:
        """Queue every allowed run: read its submission for the agent and priority, record run.queued."""
        for (tenant, run_id), allowed in list(self.state.allowed.items()):
            with consuming(SERVICE, "scheduler.queue", allowed.trace_headers, run_id=run_id):
                stored = await self.js.get_msg(self.streams.commands, allowed.request_seq, direct=True)
                submission = parse_envelope(stored.data or b"")
                queued = self.emit(
                    RunQueued(
                        decision_id=allowed.decision_id,
                        priority=submission.data.priority,
                        agent=submission.data.agent,
                        request_seq=allowed.request_seq,
                    ),
                    allowed.cause,
                )
                await self.publish(
                    queued, self.subjects.expected_subject(queued), self.streams.events, f"queued-{tenant}-{run_id}"
                )
                evolve(self.state, queued, allowed.trace_headers)
                log.info("run queued", run_id=run_id, tenant=tenant, priority=submission.data.priority)

    async def dispatch(self, run: QueuedRun) -> None:
        """Hand a run to the runners: the work item first, then the event that records it.

        Both are keyed by the run, so a scheduler that crashed between the two and dispatches the
        run again after its restart does not create a second work item.
        """
        with consuming(SERVICE, "scheduler.dispatch", run.trace_headers, run_id=run.run_id):
            dispatched = self.emit(
                RunDispatched(decision_id=run.decision_id, agent=run.agent, request_seq=run.request_seq), run.cause
            )
            key = f"dispatched-{run.tenant}-{run.run_id}"
            await self.publish(dispatched, self.subjects.work(run.tenant), self.streams.work, key)
            await self.publish(dispatched, self.subjects.expected_subject(dispatched), self.streams.events, key)
            evolve(self.state, dispatched)
            log.info(
                "run dispatched", run_id=run.run_id, tenant=run.tenant, running=len(self.state.running[run.tenant])
            )

    async def act(self) -> None:
        await self.queue_allowed()
        for run in next_dispatches(self.state, self.settings.tenant_concurrency):
            await self.dispatch(run)

    def apply(self, message: Msg) -> None:
        self.last_seq = message.metadata.sequence.stream
        if (message.headers or {}).get("Warden-Type") not in WATCHED_TYPES:
            return
        try:
            envelope = parse_envelope(message.data)
        except InvalidMessage as exc:
            log.warning("ignoring an invalid event", subject=message.subject, error=str(exc))
            return
        headers: Mapping[str, str] = message.headers or {}
        evolve(self.state, envelope, {k: v for k, v in headers.items() if k in {"traceparent", "tracestate"}})

    async def run(self) -> None:
        """Fold the stream forever; once caught up, act after every batch of events."""
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def enqueue(message: Msg) -> None:
            inbox.put_nowait(message)

        # An ordered consumer from sequence 1: ephemeral (the scheduler's position is its state,
        # rebuilt on every start), flow-controlled, and re-created by nats-py after any gap.
        # Push, not pull: nats-py's long-poll fetch waits for a full batch, which made every
        # quiet moment a half-second stall in dispatching.
        subscription = await self.js.subscribe(
            self.subjects.all_events,
            stream=self.streams.events,
            cb=enqueue,
            ordered_consumer=True,
            # Only the types the state is folded from: steps and tool calls (most events) stay away.
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL,
                filter_subjects=[self.subjects.events_of_type(MESSAGE_TYPES[name]) for name in sorted(WATCHED_TYPES)],
            ),
        )
        if not (await self.js.stream_info(self.streams.events)).state.messages:
            self.caught_up = True  # an empty stream: nothing to rebuild
        try:
            while True:
                try:
                    batch = [await asyncio.wait_for(inbox.get(), IDLE_TICK_SECONDS)]
                except TimeoutError:
                    batch = []
                while batch and len(batch) < FETCH_BATCH and not inbox.empty():
                    batch.append(inbox.get_nowait())
                for message in batch:
                    self.apply(message)
                if batch and batch[-1].metadata.num_pending == 0 and not self.caught_up:
                    self.caught_up = True
                    log.info(
                        "state rebuilt",
                        last_seq=self.last_seq,
                        queued=len(self.state.queued),
                        running=sum(len(runs) for runs in self.state.running.values()),
                    )
                if self.caught_up:
                    await self.act()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    return consumer_service(settings, lambda broker: Scheduler(settings, broker).run())


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
