"""The policy gate: every command passes here first; bad ones are rejected, the rest decided by Rego."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage
from faststream.params import NoCast
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.policy_gate.decide import decision, policy_input, unknown_agent
from services.policy_gate.engine import PolicyEngine, PolicyEvaluationError
from services.policy_gate.intake import check_command, rejection_tenant
from shared.bus import MSG_ID_HEADER, envelope_headers
from shared.messages import (
    CommandRejected,
    DecisionMade,
    Effect,
    Envelope,
    RunSubmitted,
    ToolCallRequested,
    make_envelope,
)
from shared.service import run_service
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects
from shared.telemetry import consuming

SERVICE = "policy-gate"
DURABLE_NAME = "policy_gate"
# A command whose outcome cannot be published after this many deliveries is left in the stream
# (the audit trail still has it) rather than retried forever; the server emits a max-deliveries
# advisory for it.
MAX_DELIVERIES = 5
RETRY_DELAY_SECONDS = 1.0
MAX_IN_FLIGHT = 64
PUBLISH_TIMEOUT_SECONDS = 5.0
# A policy that has not answered by then is a deny: the gate fails closed.
POLICY_TIMEOUT_SECONDS = 1.0

log = structlog.get_logger(__name__)


def _keep_raw(message: NatsMessage) -> Msg:
    # Intake judges the raw bytes itself, so a non-JSON body must reach the handler undecoded.
    return message.raw_message


class PolicyDecider:
    """Evaluates policies on one dedicated thread, so a slow policy never blocks the event loop."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        # regorus engines are not shared between threads: one thread owns this one.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rego")

    async def decide(self, envelope: Envelope[Any], request_seq: int) -> DecisionMade:
        started = time.perf_counter()
        data = envelope.data
        effect: Effect
        reasons: list[str]
        try:
            if isinstance(data, ToolCallRequested) and not self.engine.knows_tool(data.tool):
                effect, reasons = "deny", [f"unknown tool {data.tool!r}: it is not in the policy data's tool catalogue"]
            else:
                loop = asyncio.get_running_loop()
                result = await asyncio.wait_for(
                    loop.run_in_executor(self.executor, self.engine.evaluate, policy_input(envelope)),
                    POLICY_TIMEOUT_SECONDS,
                )
                effect, reasons = result.effect, list(result.reasons)
        except TimeoutError:
            effect, reasons = "deny", [f"policy evaluation took longer than {POLICY_TIMEOUT_SECONDS}s (fail closed)"]
        except PolicyEvaluationError as exc:
            effect, reasons = "deny", [f"policy evaluation failed (fail closed): {exc}"]
        elapsed_ms = (time.perf_counter() - started) * 1000
        return decision(
            envelope,
            request_seq=request_seq,
            effect=effect,
            reasons=reasons,
            policy_revision=self.engine.revision,
            evaluation_ms=round(elapsed_ms, 3),
        )


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    broker = NatsBroker(settings.nats_url)
    decider = PolicyDecider(PolicyEngine.load(Path(settings.policy_dir)))
    log.info("policies loaded", revision=decider.engine.revision, directory=str(settings.policy_dir))

    async def publish(envelope: Envelope[Any], idempotency_key: str) -> None:
        await broker.publish(
            envelope.to_bytes(),
            subjects.expected_subject(envelope),
            headers=envelope_headers(envelope, idempotency_key),
            stream=streams.events,
            timeout=PUBLISH_TIMEOUT_SECONDS,
        )

    async def record_outcome(message: Msg, outcome: Envelope[Any] | CommandRejected) -> None:
        metadata = message.metadata
        seq = metadata.sequence.stream
        if (
            isinstance(outcome, Envelope)
            and isinstance(outcome.data, RunSubmitted)
            and not decider.engine.knows_agent(outcome.data.agent)
        ):
            outcome = unknown_agent(
                outcome,
                nats_subject=message.subject,
                request_seq=seq,
                size_bytes=len(message.data),
                idempotency_key=(message.headers or {}).get(MSG_ID_HEADER),
            )
        if isinstance(outcome, CommandRejected):
            rejection = make_envelope(
                outcome,
                tenant=rejection_tenant(subjects, message.subject),
                subject=str(seq),
                actor=SERVICE,
                source=SERVICE,
            )
            # Keyed by the command's position: a redelivered command is rejected once.
            await publish(rejection, f"rejected-{metadata.stream}-{seq}")
            log.warning("command rejected", code=outcome.code, reason=outcome.reason)
            return
        verdict = await decider.decide(outcome, seq)
        event = make_envelope(
            verdict, tenant=outcome.tenant, subject=outcome.subject, actor=SERVICE, source=SERVICE, caused_by=outcome
        )
        await publish(event, f"decision-{metadata.stream}-{seq}")
        log.info(
            "decision made",
            type=outcome.type,
            effect=verdict.effect,
            decision_id=verdict.decision_id,
            reasons=verdict.reasons,
            evaluation_ms=verdict.evaluation_ms,
        )

    @broker.subscriber(
        subjects.all_commands,
        # A push consumer shared by every gate instance through the queue group: JetStream
        # spreads commands across them and redelivers what an instance leaves unacknowledged.
        stream=JStream(streams.commands, declare=False),
        # With a queue group and no `durable`, nats-py names the durable consumer after the group.
        queue=DURABLE_NAME,
        deliver_policy=DeliverPolicy.ALL,
        config=ConsumerConfig(max_deliver=MAX_DELIVERIES, ack_wait=30.0, max_ack_pending=MAX_IN_FLIGHT),
        max_workers=MAX_IN_FLIGHT,
        # Manual: ack once the outcome is stored; nak with a delay when publishing it failed.
        ack_policy=AckPolicy.MANUAL,
        decoder=_keep_raw,
    )
    async def on_command(message: NoCast[Msg]) -> None:
        metadata = message.metadata
        outcome = check_command(
            subjects,
            nats_subject=message.subject,
            data=message.data,
            headers=message.headers,
            stream_seq=metadata.sequence.stream,
            max_bytes=settings.max_command_bytes,
        )
        run_id = outcome.subject if isinstance(outcome, Envelope) else None
        with (
            consuming(
                SERVICE, "policy_gate.decide", message.headers, run_id=run_id, stream_seq=metadata.sequence.stream
            ),
            structlog.contextvars.bound_contextvars(
                run_id=run_id, subject=message.subject, stream_seq=metadata.sequence.stream
            ),
        ):
            try:
                await record_outcome(message, outcome)
            except (NatsError, TimeoutError) as exc:
                if metadata.num_delivered >= MAX_DELIVERIES:
                    log.error("giving up on command after repeated publish failures", error=repr(exc))
                    await message.term()
                else:
                    log.warning("could not record outcome; will retry", error=repr(exc))
                    await message.nak(delay=RETRY_DELAY_SECONDS * metadata.num_delivered)
                return
        await message.ack()

    return FastStream(broker)


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
