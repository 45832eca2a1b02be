"""The agent runner: takes dispatched runs from the work queue and executes them, several at once."""

import asyncio
import contextlib
import json
import os
import socket
from typing import Any

import nats.errors
import structlog
from faststream import FastStream
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from warden.agent_runner.agents import SHIPPED_AGENTS_DIR, AgentCatalogue
from warden.agent_runner.decision_feed import DecisionFeed
from warden.agent_runner.execution import SERVICE, RunExecutor
from warden.bus import retry_transient
from warden.channels import ServiceChannels
from warden.consumers import durable_pull, fetch_batch, heartbeat, watch_ground
from warden.controls import ControlFeed
from warden.dead_letters import give_up
from warden.errors import InvalidMessage, RejectionCode
from warden.messages import (
    ApprovalRequested,
    DecisionMade,
    DecisionRefused,
    MessageDeadLettered,
    ModelCallRequested,
    PolicyChanged,
    RunCancelled,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunStarted,
    RunSucceeded,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.policy_bundle import PolicyBundle
from warden.policy_lifecycle import Lifecycle, follow_policy_changes
from warden.secret_arguments import POLICY_DATA_FILE, shipped_policy_dir
from warden.service import consumer_service, run_service
from warden.settings import Settings
from warden.signing import DecisionVerifier
from warden.streams import StreamNames
from warden.subjects import Subjects

DURABLE_NAME = "agent_runner"
# A run whose runners keep dying is failed on the record after this many attempts, not retried forever.
MAX_ATTEMPTS = 3

log = structlog.get_logger(__name__)


class Runner:
    def __init__(self, settings: Settings, nc: NatsClient, channels: ServiceChannels) -> None:
        self.settings = settings
        self.nc = nc
        self.channels = channels
        self.js = js = nc.jetstream()
        self.subjects = Subjects(settings.subject_prefix)
        self.streams = StreamNames.for_prefix(settings.subject_prefix)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        self.decisions = DecisionFeed(js, self.subjects, self.streams.events)
        verifier = DecisionVerifier.from_file(settings.trusted_keys_path())
        # Cancels and halts in force, rebuilt from sequence 1 on every start: halts survive restarts.
        self.controls = ControlFeed(js, self.subjects, self.streams.events, verifier)
        self.executor = RunExecutor(
            settings,
            js,
            catalogue=AgentCatalogue.load(settings.agents_dir or SHIPPED_AGENTS_DIR),
            worker=worker,
            decisions=self.decisions,
            verifier=verifier,
            channels=channels,
            controls=self.controls,
        )
        # The pack's data the runner enforces follows the gates' promotes and rollbacks.
        self.policy = Lifecycle(PolicyBundle.read(settings.policy_dir or shipped_policy_dir()), _revision)
        self.slots = asyncio.Semaphore(settings.runner_concurrency)
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, message: Msg) -> None:
        attempt = message.metadata.num_delivered
        try:
            work = parse_envelope(message.data, type_hint=RunDispatched.TYPE)
            if not isinstance(work.data, RunDispatched):
                raise InvalidMessage(
                    RejectionCode.UNKNOWN_TYPE, f"a work item must be a run.dispatched, not {work.type}"
                )
            if message.subject != self.subjects.work(work.tenant):
                raise InvalidMessage(
                    RejectionCode.SUBJECT_MISMATCH, f"a work item of {work.tenant!r} arrived on {message.subject!r}"
                )
        except InvalidMessage as exc:
            # Only the scheduler writes work items; a bad one can never run. Terminated, it leaves the
            # work queue, so it is recorded as a dead letter, bytes and all, first.
            log.error("invalid work item; terminating it", error=str(exc), subject=message.subject)
            await give_up(
                self.js, self.subjects, self.streams.events, message, f"invalid work item: {exc}", source=SERVICE
            )
            return
        if attempt > MAX_ATTEMPTS:
            failed = make_envelope(
                RunFailed(
                    reason=f"no runner finished the run in {MAX_ATTEMPTS} attempts", error_type="AttemptsExhausted"
                ),
                tenant=work.tenant,
                entity_id=work.entity_id,
                actor=SERVICE,
                source=SERVICE,
                caused_by=work,
            )
            await self.channels.store(failed, f"{work.entity_id}-finished")
            await message.ack()
            return
        beat = asyncio.create_task(heartbeat(message, self.settings.runner_ack_wait_seconds / 3))
        try:
            await self.executor.execute(work, message.headers, attempt)
        except (nats.errors.Error, TimeoutError) as exc:
            # The bus stayed unavailable past the retries inside (or refused something): leave the
            # work unacknowledged; it comes back, and the run resumes after its last recorded step.
            log.warning("run interrupted; it will be resumed", run_id=work.entity_id, error=repr(exc), exc_info=True)
            await message.nak(delay=1.0)
            return
        finally:
            beat.cancel()
        await message.ack()

    async def run(self) -> None:
        """Take one work item whenever a slot is free, so nothing waits in this process unstarted."""
        # Shared by every runner: the first to start creates it, and the others take it as it is.
        subscription = await retry_transient(
            lambda: durable_pull(
                self.js,
                self.streams.work,
                ConsumerConfig(
                    durable_name=DURABLE_NAME,
                    name=DURABLE_NAME,
                    filter_subject=self.subjects.all_work,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.settings.runner_ack_wait_seconds,
                    max_ack_pending=1024,
                ),
                existing="keep",
            ),
            what="the runner's work consumer",
        )
        # The decision feed is open before any run is taken, so no run asks for a decision it cannot see.
        await retry_transient(self.decisions.open, what="the decision feed")
        # And no run is taken before every stop stored so far is known.
        await retry_transient(self.controls.open, what="the cancels and halts in force")
        # Nor before the policy data in force is.
        policy = await retry_transient(
            lambda: follow_policy_changes(self.nc, self.settings.subject_prefix, self.on_policy_changed),
            what="the policy lifecycle",
        )
        try:
            await self._take_work(subscription)
        finally:
            # Runs cut short stay unacknowledged in the work queue: another runner resumes them.
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.decisions.close()
            await self.controls.close()
            await policy.stop()
            await self.executor.models.close()
            await asyncio.gather(*(toolbox.aclose() for toolbox in self.executor.toolboxes.values()))
            # Work delivered and never fetched would otherwise hold the connection's drain, at
            # shutdown, until nats-py gives up on it (30 s).
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def on_policy_changed(self, changed: PolicyChanged, seq: int) -> None:
        """Follow the policy lifecycle as the gates do; on a promote or rollback, enforce the new bundle's data."""
        in_force = self.policy.active
        problem = self.policy.apply(changed, seq, lambda: PolicyBundle(changed.files or {}))
        if problem is not None:
            log.error("policy change not followed", stream_seq=seq, problem=problem)
        if self.policy.active is in_force:
            return
        try:
            data = json.loads(self.policy.active.files[POLICY_DATA_FILE]).get("warden", {})
            self.executor.use_policy_data(data if isinstance(data, dict) else {})
        except (KeyError, ValueError, AttributeError) as exc:
            # The gate loaded this bundle before allowing it, so this is a bug: keep the data in force.
            log.error("the policy data in force could not be read", revision=changed.revision, error=repr(exc))
            return
        log.info("policy data in force", revision=self.policy.active.revision, stream_seq=seq)

    async def _take_work(self, subscription: Any) -> None:
        """Take as many waiting runs as there are free slots at once: one fetch at a time, under load,
        left a burst of dispatched runs queueing behind each other's round trips."""
        while True:
            await self.slots.acquire()
            free = 1
            while not self.slots.locked():
                await self.slots.acquire()
                free += 1
            try:
                messages = await fetch_batch(subscription, free, 1.0)
            except BaseException:
                for _ in range(free):
                    self.slots.release()
                raise
            for _ in range(free - len(messages)):
                self.slots.release()
            for message in messages:
                task = asyncio.create_task(self.handle(message))
                self.tasks.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: "asyncio.Task[None]") -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("run handler failed", error=repr(error))


def _revision(bundle: PolicyBundle) -> str:
    return bundle.revision


def channels(prefix: str) -> ServiceChannels:
    """What the runner receives and sends, as FastStream declares it: schemas/asyncapi.json is made from this."""
    declared = ServiceChannels(SERVICE, prefix)
    declared.receives(
        "work",
        (RunDispatched.TYPE,),
        stream=declared.streams.work,
        consumer="pull",
        durable=DURABLE_NAME,
        how="Dispatched runs, as many at a time as the runner has free slots; a run is acknowledged when "
        "it ends (with in-progress acknowledgements meanwhile) and left to come back when the bus "
        "fails mid-run, so another runner resumes it after its last recorded step.",
    )
    declared.receives(
        "events",
        (
            DecisionMade.TYPE,
            PolicyChanged.TYPE,
            RunStarted.TYPE,
            StepCompleted.TYPE,
            ToolCallCompleted.TYPE,
            RunSucceeded.TYPE,
            RunFailed.TYPE,
            RunCancelled.TYPE,
        ),
        stream=declared.streams.events,
        consumer="ordered",
        how="The decisions on its requests and on cancels and halts, the policy lifecycle, and a run's "
        "own history when it takes the run up (each read by an ordered consumer of its own).",
    )
    declared.sends(
        "commands",
        (ToolCallRequested.TYPE, ModelCallRequested.TYPE),
        stream=declared.streams.commands,
        how="Each tool call and model call an agent wants to make, for the gate to decide on first.",
    )
    declared.sends(
        "events",
        (
            RunStarted.TYPE,
            StepCompleted.TYPE,
            ToolCallCompleted.TYPE,
            ApprovalRequested.TYPE,
            DecisionRefused.TYPE,
            RunPaused.TYPE,
            RunSucceeded.TYPE,
            RunFailed.TYPE,
            RunCancelled.TYPE,
            MessageDeadLettered.TYPE,
        ),
        stream=declared.streams.events,
        how="Every step of a run and how it ends, the approvals it waits for, the decisions it refuses "
        "to act on (their signatures do not check out), and the work items it gives up on.",
    )
    return declared


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    work = StreamNames.for_prefix(settings.subject_prefix).work
    declared = channels(settings.subject_prefix)
    return consumer_service(
        settings,
        declared,
        lambda broker: Runner(settings, broker.connection, declared).run(),
        lambda js: watch_ground(lambda: js.consumer_info(work, DURABLE_NAME), f"the consumer {DURABLE_NAME} on {work}"),
    )


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
