"""The policy gate: every command passes here first; bad ones are rejected, the rest decided by Rego."""

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from faststream import FastStream
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from warden.admission import CommandRules, rejection
from warden.bus import envelope_headers, retry_transient
from warden.channels import ServiceChannels
from warden.consumers import heartbeat, shared_push, terminate, watch_ground
from warden.errors import InvalidMessage, RejectionCode
from warden.messages import (
    ApprovalAnswered,
    ApprovalRequested,
    CommandRejected,
    DecisionMade,
    DecisionShadowed,
    Envelope,
    PolicyActivated,
    PolicyChanged,
    PolicyChangeRequested,
    make_envelope,
    parse_envelope,
)
from warden.policy_bundle import revision_token
from warden.policy_gate.activation import SERVICE, activation, describe
from warden.policy_gate.decide import PolicyDecider, judge_input
from warden.policy_gate.engine import SHIPPED_POLICY_DIR, PolicyEngine
from warden.policy_gate.lifecycle import PolicyLifecycle
from warden.policy_lifecycle import follow_policy_changes
from warden.reader import FilteredReader
from warden.service import consumer_service, run_service
from warden.settings import Settings
from warden.signing import DecisionSigner, DecisionVerifier
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.telemetry import consuming
from warden.wire import TYPE_HEADER, is_transient

DURABLE_NAME = "policy_gate"
# A command whose outcome cannot be published after this many deliveries is terminated, with the
# reason, rather than retried forever; it stays in the commands stream (the audit trail still has
# it), and the server's terminated advisory makes it a dead letter (see warden.dead_letters).
MAX_DELIVERIES = 5
RETRY_DELAY_SECONDS = 1.0
# Commands delivered and not yet acknowledged, across all gate instances.
MAX_IN_FLIGHT = 2048
PUBLISH_TIMEOUT_SECONDS = 5.0
COMMAND_ACK_WAIT_SECONDS = 30.0
# Live decisions waiting to be judged on the shadow bundle. Past this the gate is falling behind:
# the newest are left unjudged (and counted in the log) rather than slowing the decisions down.
SHADOW_BACKLOG = 4096
# How long a gate that allowed a policy change waits to have folded it in before its next command.
FOLLOW_TIMEOUT_SECONDS = 10.0

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Answer:
    """The event that answers a command, ready to publish (again, should the first try fail)."""

    command: Msg
    subject: str
    body: bytes
    headers: dict[str, str]


class Gate:
    """Decides each command as it arrives; acks it only once its outcome is stored.

    The decision is made and published inside the subscription's callback, with nothing queued
    in between: on an idle gate the outcome is on the wire one step after the command arrives.
    The publishes are pipelined (`publish_async`), and one task settles them in arrival order,
    a whole backlog at a time: ack what JetStream stored, nak or term what it did not.
    """

    def __init__(
        self,
        settings: Settings,
        nc: NatsClient,
        decider: PolicyDecider,
        channels: ServiceChannels,
        policy_origin: str = "(given)",
    ) -> None:
        self.settings = settings
        self.channels = channels
        self.policy_origin = policy_origin
        self.nc = nc
        self.js = nc.jetstream()
        self.decider = decider
        self.lifecycle = PolicyLifecycle(decider.engine, origin=policy_origin)
        # The stream sequence of the last policy.changed folded in, and a wake-up for those waiting on it.
        self.lifecycle_seq = 0
        self.lifecycle_moved = asyncio.Condition()
        self.following_live = False
        self.shadowing: asyncio.Queue[tuple[Envelope[Any], PolicyEngine]] = asyncio.Queue(SHADOW_BACKLOG)
        self.shadow_skipped = 0
        self.subjects = Subjects(settings.subject_prefix)
        self.rules = CommandRules(self.subjects, settings.max_command_bytes)
        self.streams = StreamNames.for_prefix(settings.subject_prefix)
        self.unsettled: asyncio.Queue[tuple[Answer, asyncio.Future[PubAck]]] = asyncio.Queue()
        self.retrying: set[asyncio.Task[None]] = set()

    def outcome(self, message: Msg, approval: ApprovalRequested | str | None = None) -> tuple[Envelope[Any], str]:
        """The event that answers one command (a rejection or a decision) and its idempotency key.

        `approval`: for an answer to an approval request, that request (see `approval_named_by`).
        Never raises: the answer depends only on the stored commands and events, so a command
        that makes the gate fail would fail on every delivery; it is rejected (`unprocessable`)
        at once instead.
        """
        metadata = message.metadata
        seq = metadata.sequence.stream
        try:
            checked = self.rules.judge(message.subject, message.data, message.headers, seq)
            if isinstance(checked, Envelope):
                return self._decided(checked, seq, approval), f"decision-{metadata.stream}-{seq}"
        except Exception as exc:
            log.exception("the gate failed on a command; rejecting it", subject=message.subject, stream_seq=seq)
            checked = rejection(
                message.subject,
                message.data,
                message.headers,
                seq,
                code=RejectionCode.UNPROCESSABLE,
                reason=f"the policy gate failed on this command: {type(exc).__name__}: {exc}",
            )
        answer = make_envelope(
            checked, tenant=self.subjects.tenant_of(message.subject), entity_id=str(seq), actor=SERVICE, source=SERVICE
        )
        log.warning(
            "command rejected", subject=message.subject, stream_seq=seq, code=checked.code, reason=checked.reason
        )
        # Keyed by the command's position: a redelivered command is rejected once.
        return answer, f"rejected-{metadata.stream}-{seq}"

    async def approval_named_by(self, message: Msg) -> ApprovalRequested | str | None:
        """For a valid answer to an approval request, the request it names (read by its sequence in
        the events stream), or why that is not one; None for any other command.

        A bus failure is raised: the command stays unacknowledged and comes again.
        """
        if not message.subject.endswith(f".{ApprovalAnswered.TYPE}"):
            return None
        try:
            command = self.rules.judge(message.subject, message.data, message.headers, message.metadata.sequence.stream)
        except Exception:  # `outcome` judges it again and records why
            return None
        if not isinstance(command, Envelope) or not isinstance(command.data, ApprovalAnswered):
            return None
        seq, approval_id = command.data.approval_seq, command.data.approval_id
        try:
            stored = await retry_transient(
                lambda: self.js.get_msg(self.streams.events, seq, direct=True), what="an approval request"
            )
        except nats.js.errors.NotFoundError:
            return f"no approval request {approval_id} at events sequence {seq}"
        try:
            found = parse_envelope(stored.data or b"", type_hint=(stored.headers or {}).get(TYPE_HEADER))
            self.subjects.check_envelope_subject(found, stored.subject or "")
        except InvalidMessage as exc:
            return f"events sequence {seq} is not a valid approval request: {exc}"
        request = found.data
        names_it = (found.tenant, found.entity_id) == (command.tenant, command.entity_id)
        if not isinstance(request, ApprovalRequested) or not names_it or request.approval_id != approval_id:
            return f"events sequence {seq} is not approval request {approval_id} of run {command.entity_id}"
        return request

    def _decided(self, command: Envelope[Any], seq: int, approval: ApprovalRequested | str | None) -> Envelope[Any]:
        change = command.data
        refusal = (
            functools.partial(self.lifecycle.refusal, change) if isinstance(change, PolicyChangeRequested) else None
        )
        verdict = self.decider.decide(command, seq, approval, refusal=refusal)
        log.info(
            "decision made",
            run_id=command.entity_id,
            type=command.type,
            effect=verdict.effect,
            decision_id=verdict.decision_id,
            evaluation_ms=verdict.evaluation_ms,
        )
        return make_envelope(
            verdict,
            tenant=command.tenant,
            entity_id=command.entity_id,
            actor=SERVICE,
            source=SERVICE,
            caused_by=command,
        )

    async def decide(self, message: Msg) -> None:
        """Answer one command and send the answer (pipelined); `settle` acks the command once it is stored."""
        if message.subject.endswith(f".{PolicyChangeRequested.TYPE}"):
            await self.change_policy(message)
            return
        with consuming(SERVICE, "policy_gate.decide", message.headers, stream_seq=message.metadata.sequence.stream):
            approval = await self.approval_named_by(message)
            event, key = self.outcome(message, approval)
            answer = Answer(
                message, self.subjects.expected_subject(event), event.to_bytes(), envelope_headers(event, key)
            )
        try:
            stored = await self.js.publish_async(
                answer.subject, answer.body, headers=answer.headers, stream=self.streams.events
            )
        except nats.errors.Error as exc:
            self._publish_later(answer, exc)
            return
        self.unsettled.put_nowait((answer, stored))
        self._shadow(event)

    def _shadow(self, event: Envelope[Any]) -> None:
        """Hand a live decision to the shadow bundle, if one is loaded: judged after it is sent."""
        shadow = self.lifecycle.shadow
        if shadow is None or not isinstance(event.data, DecisionMade) or event.data.input is None:
            return  # a decision made on grounds its input does not hold is the gate's, not a policy's
        try:
            self.shadowing.put_nowait((event, shadow))
        except asyncio.QueueFull:
            self.shadow_skipped += 1
            if self.shadow_skipped % SHADOW_BACKLOG == 1:
                log.warning(
                    "the shadow bundle is falling behind; live decisions left unjudged", skipped=self.shadow_skipped
                )

    async def judge_on_shadow(self) -> None:
        """Judge each live decision again on the shadow bundle and record each disagreement; never enforced."""
        while True:
            event, shadow = await self.shadowing.get()
            made = event.data
            assert isinstance(made, DecisionMade)
            assert made.input is not None
            try:
                effect, reasons = judge_input(shadow, made.input)
            except Exception:  # the candidate's failure is the candidate's: the live decision stands
                log.exception("the shadow bundle failed on a decision", decision_id=made.decision_id)
                continue
            if (effect, list(reasons)) == (made.effect, list(made.reasons)):
                continue
            disagreement = make_envelope(
                DecisionShadowed(
                    decision_id=made.decision_id,
                    request_type=made.request_type,
                    request_seq=made.request_seq,
                    entity_id=event.entity_id,
                    active_revision=made.policy_revision,
                    active_effect=made.effect,
                    active_reasons=list(made.reasons),
                    candidate_revision=shadow.revision,
                    candidate_effect=effect,
                    candidate_reasons=list(reasons),
                ),
                tenant=event.tenant,
                entity_id=revision_token(shadow.revision),
                actor=SERVICE,
                source=SERVICE,
                caused_by=event,
            )
            key = f"shadowed-{made.decision_id}-{revision_token(shadow.revision)}"
            try:
                await self.channels.store(disagreement, key)
            except nats.errors.Error as exc:
                log.error("could not record a shadow disagreement", decision_id=made.decision_id, error=repr(exc))

    async def change_policy(self, message: Msg) -> None:
        """Decide a policy change and, if allowed, record it as `policy.changed`; ack once both are stored.

        Handled one at a time, and this gate takes its next command only once it has folded the
        change in (from the stream, as every gate does): its later decisions are made under it.
        """
        seq = message.metadata.sequence.stream
        with consuming(SERVICE, "policy_gate.change_policy", message.headers, stream_seq=seq):
            event, key = self.outcome(message)
        try:
            stored_decision = await self.channels.store(event, key)
            made = event.data
            if stored_decision.duplicate:
                # A redelivery: the decision stored first stands (the lifecycle may have moved since),
                # and its change is recorded if it was allowed and this delivery's was cut short.
                made = await self._recorded(stored_decision.seq)
            if isinstance(made, DecisionMade) and made.effect == "allow":
                command = self.rules.judge(message.subject, message.data, message.headers, seq)
                assert isinstance(command, Envelope)
                recording = self.lifecycle.change_event(command, made.decision_id, seq)
                if recording is None:
                    log.info(
                        "a redelivered policy change the lifecycle no longer allows (followed already)", stream_seq=seq
                    )
                else:
                    stored = await self.channels.store(*recording)
                    await self._folded(stored.seq)
        except nats.errors.Error as exc:
            await self._give_up_or_redeliver(message, exc)
            return
        await message.ack()

    async def _recorded(self, seq: int) -> Any:
        """The payload of the event stored at `seq` in the events stream (None if it is not there or not valid)."""
        try:
            stored = await retry_transient(
                lambda: self.js.get_msg(self.streams.events, seq, direct=True), what="a recorded decision"
            )
            return parse_envelope(stored.data or b"", type_hint=(stored.headers or {}).get(TYPE_HEADER)).data
        except (nats.js.errors.NotFoundError, InvalidMessage) as exc:
            log.error("the decision on a policy change could not be read back", stream_seq=seq, error=repr(exc))
            return None

    async def _folded(self, stream_seq: int) -> None:
        """Wait until this gate's lifecycle has folded in the event at `stream_seq`."""
        async with self.lifecycle_moved:
            try:
                await asyncio.wait_for(
                    self.lifecycle_moved.wait_for(lambda: self.lifecycle_seq >= stream_seq), FOLLOW_TIMEOUT_SECONDS
                )
            except TimeoutError:
                log.warning("a policy change is stored but not folded in yet", stream_seq=stream_seq)

    async def on_policy_changed(self, changed: PolicyChanged, seq: int) -> None:
        """Fold one `policy.changed` in; a promote or rollback followed live is recorded before it takes effect."""
        following = self.lifecycle.next_active(changed)
        if following is not None and self.following_live:
            # On the record before the first decision under it (a restart records its start instead).
            await self.record_activation(
                *activation(
                    following,
                    cause="promote" if changed.change == "promote" else "rollback",
                    activated_by=changed.changed_by,
                    origin=f"events:{seq}",
                    reason=changed.reason,
                    previous_revision=self.lifecycle.active.revision,
                    lifecycle_seq=seq,
                )
            )
        problem = self.lifecycle.follow(changed, seq)
        if problem is not None:
            log.error("policy change not followed", stream_seq=seq, problem=problem)
        # Between two decisions: each decision reads the engine once (see PolicyDecider).
        self.decider.engine = self.lifecycle.active
        log.info(
            "policy lifecycle moved",
            change=changed.change,
            revision=changed.revision,
            active=self.lifecycle.active.revision,
            shadow=self.lifecycle.shadow.revision if self.lifecycle.shadow else None,
            stream_seq=seq,
        )
        async with self.lifecycle_moved:
            self.lifecycle_seq = seq
            self.lifecycle_moved.notify_all()

    async def follow_lifecycle(self) -> FilteredReader:
        """Fold the policy lifecycle from the stream's start, return once caught up, and go on following it."""
        reader = await retry_transient(
            lambda: follow_policy_changes(self.nc, self.settings.subject_prefix, self.on_policy_changed),
            what="the policy lifecycle",
        )
        self.following_live = True
        return reader

    async def settle(self) -> None:
        """Ack each command whose outcome JetStream stored; retry (later) or give up on the others."""
        while True:
            backlog = [await self.unsettled.get()]
            while not self.unsettled.empty():
                backlog.append(self.unsettled.get_nowait())
            # One timer for the whole backlog, not one per publish.
            await asyncio.wait([stored for _, stored in backlog], timeout=PUBLISH_TIMEOUT_SECONDS)
            for answer, stored in backlog:
                if not stored.done():
                    stored.cancel()  # frees its place in nats-py's window of pending publishes
                    result: object = TimeoutError(f"no acknowledgement within {PUBLISH_TIMEOUT_SECONDS}s")
                elif stored.cancelled():  # nats-py gave up on it (its connection closed)
                    result = nats.errors.ConnectionReconnectingError()
                else:
                    result = stored.exception() or stored.result()
                if isinstance(result, BaseException):
                    self._publish_later(answer, result)
                else:
                    await answer.command.ack()

    def _publish_later(self, answer: "Answer", error: BaseException) -> None:
        """Keep trying to store an answer the bus did not take, holding its command meanwhile.

        A leader election makes every publish fail for seconds: retrying here, rather than
        letting JetStream redeliver the command, spends none of the command's deliveries on it.
        """
        if is_transient(error):
            task = asyncio.create_task(self._publish_until_stored(answer))
        else:
            task = asyncio.create_task(self._give_up_or_redeliver(answer.command, error))
        self.retrying.add(task)
        task.add_done_callback(self._retried)

    def _retried(self, task: "asyncio.Task[None]") -> None:
        self.retrying.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("could not settle a command; JetStream will deliver it again", error=repr(error))

    async def _publish_until_stored(self, answer: "Answer") -> None:
        beat = asyncio.create_task(heartbeat(answer.command, COMMAND_ACK_WAIT_SECONDS / 3))
        try:
            await retry_transient(
                lambda: self.js.publish(
                    answer.subject, answer.body, headers=answer.headers, stream=self.streams.events
                ),
                what="the answer to a command",
            )
        except nats.errors.Error as exc:
            await self._give_up_or_redeliver(answer.command, exc)
            return
        finally:
            beat.cancel()
        await answer.command.ack()

    @staticmethod
    async def _give_up_or_redeliver(message: Msg, error: BaseException) -> None:
        if message.metadata.num_delivered >= MAX_DELIVERIES:
            log.error(
                "giving up on command after repeated publish failures",
                subject=message.subject,
                stream_seq=message.metadata.sequence.stream,
                error=repr(error),
            )
            await terminate(message, f"its answer could not be stored in {MAX_DELIVERIES} deliveries: {error!r}")
        else:
            log.warning("could not record outcome; will retry", error=repr(error))
            await message.nak(delay=RETRY_DELAY_SECONDS * message.metadata.num_delivered)

    async def record_activation(self, event: Envelope[Any], key: str) -> None:
        """Store the `policy.activated` event of the bundle now in force (before deciding under it)."""
        stored = await self.channels.store(event, key)
        log.info("policy activated", duplicate=stored.duplicate, stream_seq=stored.seq, **describe(event))

    async def run(self) -> None:
        # Where the lifecycle stands (a promoted bundle, a shadow) before the first decision.
        lifecycle = await self.follow_lifecycle()
        # The bundle is on the record before the first decision that names its revision.
        await self.record_activation(
            *activation(
                self.decider.engine,
                cause="start",
                activated_by=SERVICE,
                origin=self.lifecycle.origin or self.policy_origin,
            )
        )
        settling = asyncio.create_task(self.settle())
        shadowing = asyncio.create_task(self.judge_on_shadow())
        # A push consumer shared by every gate instance through the queue group: JetStream spreads
        # commands across them and redelivers what an instance leaves unacknowledged. Push, not
        # pull: an idle gate answers at once, with no fetch round trip in the way. `decide` and the
        # settling of its answer ack each command, nak it, or terminate it with a reason.
        subscription = await retry_transient(
            lambda: shared_push(
                self.js,
                self.subjects.all_commands,
                stream=self.streams.commands,
                durable=DURABLE_NAME,
                callback=self.decide,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    max_deliver=MAX_DELIVERIES,
                    ack_wait=COMMAND_ACK_WAIT_SECONDS,
                    max_ack_pending=MAX_IN_FLIGHT,
                ),
            ),
            what="the gate's consumer",
        )
        try:
            await settling
        finally:
            try:
                await subscription.unsubscribe()
            except nats.errors.Error as exc:
                log.warning("could not unsubscribe", error=repr(exc))
            settling.cancel()
            shadowing.cancel()
            await lifecycle.stop()


def channels(prefix: str) -> ServiceChannels:
    """What the gate receives and sends, as FastStream declares it: schemas/asyncapi.json is made from this."""
    declared = ServiceChannels(SERVICE, prefix)
    declared.receives(
        "commands",
        declared.everything_on("commands"),
        stream=declared.streams.commands,
        consumer="shared push",
        durable=DURABLE_NAME,
        how="Every command, decided in arrival order. Every gate instance shares one push consumer "
        "(a queue group): a command is acknowledged once its answer is stored, retried with a growing "
        "delay while storing fails, and given up with a reason after its last delivery.",
    )
    declared.receives(
        "events",
        (PolicyChanged.TYPE,),
        stream=declared.streams.events,
        consumer="ordered",
        address=declared.subjects.policy_events_of_type(PolicyChanged),
        how="The policy lifecycle (promotions, shadows, rollbacks), followed from the start so every "
        "gate puts the same bundle in force.",
    )
    declared.sends(
        "events",
        (
            DecisionMade.TYPE,
            CommandRejected.TYPE,
            DecisionShadowed.TYPE,
            PolicyActivated.TYPE,
            PolicyChanged.TYPE,
        ),
        stream=declared.streams.events,
        how="The answer to each command (a decision or a rejection), each policy bundle it puts in force, "
        "each change of the policy lifecycle, and a shadow bundle's disagreements with live decisions.",
    )
    return declared


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    policy_dir = settings.policy_dir or SHIPPED_POLICY_DIR
    engine = PolicyEngine.load(policy_dir)
    # Refused at start (BundleTooLarge), not at the first decision: its files must fit the record.
    activation(engine, cause="start", activated_by=SERVICE, origin=str(policy_dir))
    decider = PolicyDecider(
        engine,
        DecisionSigner.from_file(settings.signing_key_path()),
        DecisionVerifier.from_file(settings.trusted_keys_path()),
    )
    log.info(
        "policies loaded",
        revision=decider.engine.revision,
        directory=str(policy_dir),
        decision_key=decider.signer.public_key,
    )
    commands = StreamNames.for_prefix(settings.subject_prefix).commands
    declared = channels(settings.subject_prefix)
    return consumer_service(
        settings,
        declared,
        lambda broker: Gate(settings, broker.connection, decider, declared, str(policy_dir)).run(),
        lambda js: watch_ground(
            lambda: js.consumer_info(commands, DURABLE_NAME), f"the consumer {DURABLE_NAME} on {commands}"
        ),
    )


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
