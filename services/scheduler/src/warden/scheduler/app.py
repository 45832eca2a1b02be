"""The scheduler: turns allowed runs into work, never more at once per tenant than its limit.

On every start it folds the events stream (only the event types it needs) and acts only once it
has caught up, so a restart neither forgets a queued run nor dispatches one twice. The fold starts
at a watermark it keeps in a key-value bucket: the first event of the oldest run still in play
(allowed, queued or running). Everything before it belongs to finished runs, so a restart takes as
long as the live runs need, not the whole history; without the bucket (or its key) it folds from
sequence 1, as it always can. A finished run seen again (a second decision on it) is recognised by
its run.queued event in the stream, so forgetting finished runs never queues one twice.

A bus failure that outlasts the retries rebuilds the state in place, as a restart would. It must
run as a single instance.
"""

import asyncio
import contextlib
import functools
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, PubAck
from nats.js.kv import KeyValue

from warden.bus import envelope_headers, is_stored, retry_transient
from warden.channels import ServiceChannels
from warden.consumers import GroundLost, ordered_subscription, watch_ground
from warden.controls import ControlFeed
from warden.errors import InvalidMessage
from warden.messages import (
    MESSAGE_TYPES,
    Envelope,
    Payload,
    RunCancelled,
    RunDispatched,
    RunQueued,
    RunResumed,
    RunSubmitted,
    make_envelope,
    parse_envelope,
)
from warden.scheduler.core import (
    WATCHED_TYPES,
    RunKey,
    SchedulerState,
    cancelled_runs,
    due_resumes,
    evolve,
    next_dispatches,
)
from warden.service import consumer_service, run_service
from warden.settings import Settings
from warden.signing import DecisionVerifier
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.telemetry import consuming
from warden.wire import TYPE_HEADER, is_transient

SERVICE = "scheduler"
FETCH_BATCH = 256
# With no new events the scheduler still looks for work this often (a run whose queueing failed).
IDLE_TICK_SECONDS = 0.5
PUBLISH_TIMEOUT_SECONDS = 5.0
WATERMARK_KEY = "fold-from"
# The watermark is written at most this often: it only shortens the next start.
WATERMARK_EVERY_SECONDS = 1.0

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
        self.folded = 0  # events applied since the state was last rebuilt
        # Where each run still in play was first seen in the stream: the watermark is the least.
        self.first_seen: dict[RunKey, int] = {}
        self.watermark_kept = 0
        self.watermark_written_at = 0.0
        self.verifier = DecisionVerifier.from_file(settings.trusted_keys_path())
        self.controls: ControlFeed | None = None

    @functools.cached_property
    def js(self) -> JetStreamContext:
        # Asked for once the broker is connected (its consumers run after start), then kept.
        return self.broker.connection.jetstream()

    async def publish(self, envelope: Envelope[Any], subject: str, stream: str, key: str) -> asyncio.Future[PubAck]:
        """Send one message pipelined (call inside the span it belongs to); `stored` waits for its ack."""
        return await self.js.publish_async(
            subject, envelope.to_bytes(), headers=envelope_headers(envelope, key), stream=stream
        )

    @staticmethod
    async def stored(acks: list[asyncio.Future[PubAck]]) -> None:
        """Wait until JetStream has stored every pipelined publish; raise if any was refused or timed out.

        The scheduler then stops (its loop is crash-only) and, restarted, rebuilds from the stream:
        every message is keyed, so what did get stored is not stored twice.
        """
        if acks:
            await asyncio.wait_for(asyncio.gather(*acks), PUBLISH_TIMEOUT_SECONDS)

    def emit(self, payload: Payload, cause: Envelope[Any]) -> Envelope[Any]:
        return make_envelope(
            payload, tenant=cause.tenant, entity_id=cause.entity_id, actor=SERVICE, source=SERVICE, caused_by=cause
        )

    async def submission(self, tenant: str, run_id: str, request_seq: int) -> Envelope[Any] | None:
        """The run.submitted command an allow decision points at, or None (logged) if the run must not be queued.

        Only the gate writes decisions, and only about commands it read, so a decision that points
        elsewhere is forged or corrupt: acting on it could start another run, and failing on it
        would stop the scheduler at the same event on every restart. A run already queued once
        (a second decision on a finished run, from before the watermark) is not queued again.
        """
        if await self.was_queued(tenant, run_id):
            log.info("a run already queued was allowed again; not queued twice", run_id=run_id, tenant=tenant)
            return None
        try:
            stored = await retry_transient(
                lambda: self.js.get_msg(self.streams.commands, request_seq, direct=True), what="a run's submission"
            )
            submission = parse_envelope(stored.data or b"", type_hint=(stored.headers or {}).get(TYPE_HEADER))
        except (nats.js.errors.NotFoundError, InvalidMessage) as exc:
            problem = f"command {request_seq} cannot be read: {exc}"
        else:
            names_the_run = (submission.tenant, submission.entity_id) == (tenant, run_id)
            if isinstance(submission.data, RunSubmitted) and names_the_run:
                return submission
            problem = f"command {request_seq} is a {submission.type} of {submission.tenant}/{submission.entity_id}"
        log.error("an allow decision does not point at its run's submission; ignored", run_id=run_id, problem=problem)
        return None

    async def was_queued(self, tenant: str, run_id: str) -> bool:
        return await is_stored(self.js, self.streams.events, self.subjects.event(tenant, RunQueued, run_id))

    async def queue_allowed(self) -> list[asyncio.Future[PubAck]]:
        """Queue every allowed run: read its submission for the agent and priority, record run.queued.

        The submissions are read concurrently and the run.queued events pipelined: one round trip
        per batch of allowed runs, not two per run.
        """
        allowed = list(self.state.allowed.items())
        submissions = await asyncio.gather(
            *(self.submission(tenant, run_id, run.request_seq) for (tenant, run_id), run in allowed)
        )
        acks = []
        for ((tenant, run_id), run), submission in zip(allowed, submissions, strict=True):
            if submission is None:
                del self.state.allowed[tenant, run_id]
                continue
            with consuming(SERVICE, "scheduler.queue", run.trace_headers, run_id=run_id):
                queued = self.emit(
                    RunQueued(
                        decision_id=run.decision_id,
                        priority=submission.data.priority,
                        agent=submission.data.agent,
                        request_seq=run.request_seq,
                        decision=run.decision,
                    ),
                    run.cause,
                )
                acks.append(
                    await self.publish(
                        queued, self.subjects.expected_subject(queued), self.streams.events, f"queued-{tenant}-{run_id}"
                    )
                )
            evolve(self.state, queued, run.trace_headers)
            log.info("run queued", run_id=run_id, tenant=tenant, priority=submission.data.priority)
        return acks

    async def act(self) -> None:
        """Queue what was allowed and dispatch what fits, pipelined, in two ordered rounds.

        A run is handed to the runners with its work item first and only then the event that
        records it: a scheduler that dies between the two dispatches the run again after its
        restart, and the work item, keyed by the run, is not stored twice. So the work items (with
        this batch's run.queued events) must be stored before any run.dispatched event is sent.
        """
        acks = await self.cancel_stopped()
        acks += await self.queue_allowed()
        acks += await self.resume_paused()
        dispatches = []
        view = self.controls.view if self.controls is not None else None
        for run in next_dispatches(self.state, self.settings.tenant_concurrency, view):
            with consuming(SERVICE, "scheduler.dispatch", run.trace_headers, run_id=run.run_id):
                dispatched = self.emit(
                    RunDispatched(
                        decision_id=run.decision_id,
                        agent=run.agent,
                        request_seq=run.request_seq,
                        decision=run.decision,
                        resume=run.resume,
                    ),
                    run.cause,
                )
                key = f"dispatched-{run.tenant}-{run.run_id}" + (f"-r{run.resume}" if run.resume else "")
                acks.append(await self.publish(dispatched, self.subjects.work(run.tenant), self.streams.work, key))
                # Headers now, inside the span, so the recording event continues the same trace.
                dispatches.append((run, dispatched, envelope_headers(dispatched, key)))
        await self.stored(acks)
        records = [
            await self.js.publish_async(
                self.subjects.expected_subject(dispatched),
                dispatched.to_bytes(),
                headers=headers,
                stream=self.streams.events,
            )
            for _, dispatched, headers in dispatches
        ]
        await self.stored(records)
        for run, dispatched, _ in dispatches:
            evolve(self.state, dispatched)
            log.info(
                "run dispatched", run_id=run.run_id, tenant=run.tenant, running=len(self.state.running[run.tenant])
            )

    async def cancel_stopped(self) -> list[asyncio.Future[PubAck]]:
        """End every cancelled run that is not under way (allowed, queued or paused): it never starts.

        Keyed like the runner's end of a run (`<run>-finished`), so a run ends once whoever ends it.
        """
        if self.controls is None:
            return []
        acks = []
        for stopped in cancelled_runs(self.state, self.controls.view):
            with consuming(SERVICE, "scheduler.cancel", stopped.trace_headers, run_id=stopped.run_id):
                cancelled = self.emit(
                    RunCancelled(
                        reason=stopped.control.reason, decision_id=stopped.control.decision_id, control="cancel"
                    ),
                    stopped.cause,
                )
                acks.append(
                    await self.publish(
                        cancelled,
                        self.subjects.expected_subject(cancelled),
                        self.streams.events,
                        f"{stopped.run_id}-finished",
                    )
                )
            evolve(self.state, cancelled)
            log.info("run cancelled before it started", run_id=stopped.run_id, tenant=stopped.tenant)
        return acks

    async def resume_paused(self) -> list[asyncio.Future[PubAck]]:
        """Queue again every paused run whose awaited calls are all answered, or one of whose approvals expired."""
        acks = []
        for paused in due_resumes(self.state, datetime.now(UTC)):
            run, resume = paused.run, paused.run.resume + 1
            reason = (
                "every tool call it awaited has an answer"
                if not paused.awaiting
                else f"the approval of tool call {min(paused.awaiting, key=paused.awaiting.__getitem__)} expired"
            )
            with consuming(SERVICE, "scheduler.resume", run.trace_headers, run_id=run.run_id):
                resumed = self.emit(
                    RunResumed(
                        reason=reason,
                        resume=resume,
                        decision_id=run.decision_id,
                        priority=run.priority,
                        agent=run.agent,
                        request_seq=run.request_seq,
                        decision=run.decision,
                    ),
                    paused.cause,
                )
                key = f"resumed-{run.tenant}-{run.run_id}-{resume}"
                acks.append(
                    await self.publish(resumed, self.subjects.expected_subject(resumed), self.streams.events, key)
                )
            evolve(self.state, resumed)
            log.info("run resumed", run_id=run.run_id, tenant=run.tenant, resume=resume, reason=reason)
        return acks

    def apply(self, message: Msg) -> None:
        seq = self.last_seq = message.metadata.sequence.stream
        self.folded += 1
        # The consumer's filter delivers only watched types; the header is a hint, never trusted.
        try:
            envelope = parse_envelope(message.data, type_hint=(message.headers or {}).get(TYPE_HEADER))
            self.subjects.check_envelope_subject(envelope, message.subject)
        except InvalidMessage as exc:
            log.warning("ignoring an invalid event", subject=message.subject, error=str(exc))
            return
        headers: Mapping[str, str] = message.headers or {}
        evolve(self.state, envelope, {k: v for k, v in headers.items() if k in {"traceparent", "tracestate"}})
        key = (envelope.tenant, envelope.entity_id)
        if key in self.state.finished:
            # Finished runs are forgotten: a second decision on one is caught by `was_queued`.
            self.state.finished.discard(key)
            self.first_seen.pop(key, None)
        elif self.state.is_known(key) or key in self.state.allowed:
            self.first_seen.setdefault(key, seq)

    def watermark(self) -> int:
        """Where a fold must start to see every event of every run still in play."""
        return min(self.first_seen.values(), default=self.last_seq + 1)

    async def keep_watermark(self, kv: KeyValue | None) -> None:
        """Write the watermark, when it moved and at most every WATERMARK_EVERY_SECONDS."""
        watermark = self.watermark()
        now = time.monotonic()
        if kv is None or watermark == self.watermark_kept or now - self.watermark_written_at < WATERMARK_EVERY_SECONDS:
            return
        await retry_transient(lambda: kv.put(WATERMARK_KEY, str(watermark).encode()), what="the fold's watermark")
        self.watermark_kept, self.watermark_written_at = watermark, now

    async def start_of_fold(self) -> tuple[KeyValue | None, int]:
        try:
            kv = await retry_transient(lambda: self.js.key_value(self.streams.scheduler), what="the scheduler's bucket")
        except nats.js.errors.NotFoundError:
            log.warning("no scheduler bucket (run `warden provision`): every start folds from sequence 1")
            return None, 1
        try:
            entry = await retry_transient(lambda: kv.get(WATERMARK_KEY), what="the fold's watermark")
        except nats.js.errors.KeyNotFoundError:
            return kv, 1
        return kv, max(1, int(entry.value or b"1"))

    async def run(self) -> None:
        """Fold and act until cancelled; a bus failure that outlasts the retries rebuilds the state in place."""
        while True:
            try:
                await self.serve()
            except nats.js.errors.NotFoundError as exc:
                # The stream went away under the fold (its consumer cannot be looked up or made):
                # said as the ground watch says it, which may not have looked yet.
                lost = f"the stream {self.streams.events}"
                log.error("what this service reads from is gone; exiting to be restarted", lost=lost, error=repr(exc))
                raise GroundLost(f"{lost} is gone: {exc}") from exc
            except (nats.errors.Error, TimeoutError) as exc:
                if not is_transient(exc):
                    raise
                log.warning("bus unavailable; rebuilding the state from the stream", error=repr(exc))
                await asyncio.sleep(1.0)

    async def serve(self) -> None:
        """Rebuild the state from the watermark, then fold the stream forever, acting on each batch once caught up."""
        self.state, self.caught_up, self.folded, self.first_seen = SchedulerState(), False, 0, {}
        kv, start = await self.start_of_fold()
        self.last_seq = start - 1
        self.watermark_kept = start
        # Cancels and halts in force, folded from sequence 1 (not the watermark: a halt may be older
        # than every run in play), before anything is dispatched.
        if self.controls is not None:
            await self.controls.close()
        self.controls = ControlFeed(self.js, self.subjects, self.streams.events, self.verifier)
        await retry_transient(self.controls.open, what="the cancels and halts in force")
        inbox: asyncio.Queue[Msg] = asyncio.Queue()

        async def enqueue(message: Msg) -> None:
            inbox.put_nowait(message)

        # An ordered consumer from the watermark: ephemeral (the scheduler's position is its
        # state, rebuilt on every start), flow-controlled, and re-created by nats-py after any
        # gap. Push, not pull: nats-py's long-poll fetch waits for a full batch, which made every
        # quiet moment a half-second stall in dispatching.
        # Only the types the state is folded from: steps and tool calls (most events) stay away.
        watched = [self.subjects.events_of_type(MESSAGE_TYPES[name]) for name in sorted(WATCHED_TYPES)]
        subscription = await retry_transient(
            lambda: ordered_subscription(
                self.js,
                watched,
                self.streams.events,
                enqueue,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                start_seq=start,
            ),
            what="the scheduler's fold",
        )
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
                if not self.caught_up and await self._caught_up(batch, subscription):
                    self.caught_up = True
                    log.info(
                        "state rebuilt",
                        folded_from=start,
                        folded=self.folded,
                        last_seq=self.last_seq,
                        queued=len(self.state.queued),
                        running=sum(len(runs) for runs in self.state.running.values()),
                    )
                if self.caught_up:
                    await self.act()
                    await self.keep_watermark(kv)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
            await self.controls.close()

    @staticmethod
    async def _caught_up(batch: list[Msg], subscription: JetStreamContext.PushSubscription) -> bool:
        if batch:
            return bool(batch[-1].metadata.num_pending == 0)
        # Nothing came for a while: either nothing is left, or nothing after the watermark is of
        # a type the fold reads. The consumer knows which.
        info = await retry_transient(subscription.consumer_info, what="the fold's progress")
        return bool(info.num_pending == 0)


def channels(prefix: str) -> ServiceChannels:
    """What the scheduler receives and sends, as FastStream declares it: schemas/asyncapi.json is made from this."""
    declared = ServiceChannels(SERVICE, prefix)
    declared.receives(
        "events",
        tuple(sorted(WATCHED_TYPES)),
        stream=declared.streams.events,
        consumer="ordered",
        how="The events its state is folded from (decisions, queued, dispatched and finished runs, pauses), "
        "from its watermark on every start, and the decisions on cancels and halts, from the first.",
    )
    declared.sends(
        "events",
        (RunQueued.TYPE, RunDispatched.TYPE, RunCancelled.TYPE, RunResumed.TYPE),
        stream=declared.streams.events,
        how="What happens to each allowed run before a runner takes it: queued, dispatched, cancelled "
        "before it started, resumed after an approval or a lifted halt.",
    )
    declared.sends(
        "work",
        (RunDispatched.TYPE,),
        stream=declared.streams.work,
        how="Each dispatched run, once, for one agent runner to take.",
    )
    return declared


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    # Its ordered consumer is re-created by nats-py when lost; the stream is what must be there.
    events = StreamNames.for_prefix(settings.subject_prefix).events
    return consumer_service(
        settings,
        channels(settings.subject_prefix),
        lambda broker: Scheduler(settings, broker).run(),
        lambda js: watch_ground(lambda: js.stream_info(events), f"the stream {events}"),
    )


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
