"""Executing one run: rebuild it from its own events, then step the agent, asking before every tool call.

A run's state is never kept anywhere but in the events stream. A runner that takes over a run
(after a crash) reads the run's events first and continues after the last recorded step, so a
recorded step is never repeated. Every publish is keyed, so a repeated one is stored once.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.agent_runner.agents import (
    AgentCatalogue,
    Fail,
    Finish,
    ModelTurn,
    Outcome,
    StepRecord,
    ToolCall,
    UnknownAgent,
)
from services.agent_runner.tools import ToolError, run_tool
from shared.bus import envelope_headers
from shared.errors import InvalidMessage
from shared.messages import (
    DecisionMade,
    Envelope,
    Payload,
    RunDispatched,
    RunFailed,
    RunStarted,
    RunSucceeded,
    RunUsage,
    StepCompleted,
    TokenUsage,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects
from shared.telemetry import consuming

SERVICE = "agent-runner"
TOOL_TIMEOUT_SECONDS = 60.0
HISTORY_TIMEOUT_SECONDS = 5.0
MAX_STEPS = 100

log = structlog.get_logger(__name__)


@dataclass
class RunHistory:
    """What the stream says already happened to a run, and the decisions on its tool calls."""

    steps: dict[int, StepRecord] = field(default_factory=dict)
    usage: RunUsage = field(default_factory=RunUsage)
    attempts: int = 0
    finished: bool = False
    decisions: dict[str, DecisionMade] = field(default_factory=dict)

    def apply(self, envelope: Envelope[Any]) -> None:
        data = envelope.data
        match data:
            case RunStarted():
                self.attempts = max(self.attempts, data.attempt)
            case StepCompleted():
                self.steps[data.step] = StepRecord(
                    step=data.step,
                    action=ModelTurn(
                        summary=data.summary,
                        input_tokens=data.usage.input_tokens,
                        output_tokens=data.usage.output_tokens,
                    ),
                )
            case ToolCallCompleted():
                # The agent needs the outcome, not the arguments, to go on (see StepRecord).
                self.steps[data.step] = StepRecord(
                    step=data.step,
                    action=ToolCall(tool=data.tool, arguments={}),
                    outcome=data.outcome,
                    result=data.result,
                    error=data.error,
                )
            case DecisionMade(tool_call_id=str() as tool_call_id):
                self.decisions[tool_call_id] = data
            case RunSucceeded() | RunFailed():
                self.finished = True

    def ordered_steps(self) -> list[StepRecord]:
        return [self.steps[step] for step in sorted(self.steps)]


class RunFeed:
    """An ordered consumer on one run's events: its history first, then decisions as they arrive."""

    def __init__(self) -> None:
        self.history = RunHistory()
        self.caught_up = asyncio.Event()
        self.waiters: dict[str, asyncio.Future[DecisionMade]] = {}
        self.subscription: Any = None

    async def open(self, js: JetStreamContext, stream: str, subject: str) -> None:
        info = await js.stream_info(stream, subjects_filter=subject)
        if not info.state.messages:
            self.caught_up.set()
        self.subscription = await js.subscribe(
            subject,
            stream=stream,
            cb=self._on_message,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        await asyncio.wait_for(self.caught_up.wait(), HISTORY_TIMEOUT_SECONDS)

    async def _on_message(self, message: Msg) -> None:
        if message.metadata.num_pending == 0:
            self.caught_up.set()
        try:
            envelope = parse_envelope(message.data)
        except InvalidMessage:
            return  # not ours to judge: the projector records it; the run's history skips it
        self.history.apply(envelope)
        if isinstance(envelope.data, DecisionMade) and envelope.data.tool_call_id:
            waiter = self.waiters.pop(envelope.data.tool_call_id, None)
            if waiter and not waiter.done():
                waiter.set_result(envelope.data)

    async def decision(self, tool_call_id: str, within: float) -> DecisionMade | None:
        if known := self.history.decisions.get(tool_call_id):
            return known
        waiter = self.waiters.setdefault(tool_call_id, asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(waiter, within)
        except TimeoutError:
            return None
        finally:
            self.waiters.pop(tool_call_id, None)

    async def close(self) -> None:
        if self.subscription is not None:
            await self.subscription.unsubscribe()


class RunExecutor:
    """Runs dispatched work to completion (or failure), publishing every step."""

    def __init__(self, settings: Settings, js: JetStreamContext, catalogue: AgentCatalogue, worker: str) -> None:
        self.settings = settings
        self.js = js
        self.catalogue = catalogue
        self.worker = worker
        self.subjects = Subjects(settings.subject_prefix)
        self.streams = StreamNames.for_prefix(settings.subject_prefix)

    async def _publish(self, envelope: Envelope[Any], key: str) -> None:
        stream = self.streams.commands if envelope.data.KIND == "command" else self.streams.events
        await self.js.publish(
            self.subjects.expected_subject(envelope),
            envelope.to_bytes(),
            headers=envelope_headers(envelope, key),
            stream=stream,
        )

    async def _has_started(self, tenant: str, run_id: str) -> bool:
        try:
            await self.js.get_last_msg(
                self.streams.events, self.subjects.event(tenant, RunStarted, run_id), direct=True
            )
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def execute(self, work: Envelope[RunDispatched], headers: Mapping[str, str] | None, attempt: int) -> None:
        tenant, run_id = work.tenant, work.subject
        with (
            consuming(SERVICE, "agent_runner.run", headers, run_id=run_id, agent=work.data.agent, attempt=attempt),
            structlog.contextvars.bound_contextvars(run_id=run_id, tenant=tenant),
        ):
            feed = RunFeed()
            # A run never started needs no history, only the decisions on its tool calls: it saves
            # this runner from being sent back every event it publishes. Any run that has started
            # (a retry, or a duplicate work item) is rebuilt from all of its events.
            if attempt == 1 and not await self._has_started(tenant, run_id):
                await feed.open(self.js, self.streams.events, self.subjects.event(tenant, DecisionMade, run_id))
            else:
                await feed.open(self.js, self.streams.events, self.subjects.run_events(tenant, run_id))
            try:
                if feed.history.finished:
                    log.info("run already finished; nothing to do")
                    return
                await self._run(work, feed, attempt)
            finally:
                await feed.close()

    async def _run(self, work: Envelope[RunDispatched], feed: RunFeed, attempt: int) -> None:
        tenant, run_id = work.tenant, work.subject

        def event(payload: Payload) -> Envelope[Any]:
            return make_envelope(payload, tenant=tenant, subject=run_id, actor=SERVICE, source=SERVICE, caused_by=work)

        await self._publish(
            event(RunStarted(decision_id=work.data.decision_id, worker=self.worker, attempt=attempt)),
            f"{run_id}-started-{attempt}",
        )
        stored = await self.js.get_msg(self.streams.commands, work.data.request_seq, direct=True)
        submission = parse_envelope(stored.data or b"")
        history = feed.history.ordered_steps()
        if history:
            log.info("resuming run", recorded_steps=len(history), attempt=attempt)
        usage = RunUsage(steps=len(history), tool_calls=sum(isinstance(s.action, ToolCall) for s in history))
        try:
            agent = self.catalogue.get(work.data.agent)
        except UnknownAgent as exc:
            await self._publish(event(RunFailed(reason=str(exc), error_type="UnknownAgent")), f"{run_id}-finished")
            return

        while len(history) < MAX_STEPS:
            step = len(history)
            try:
                action = agent.next_action(submission.data.input, history)
            except Exception as exc:  # an agent bug must end the run as failed, not kill the runner
                action = Fail(reason=f"agent {agent.name} raised {type(exc).__name__}: {exc}")
            match action:
                case ModelTurn():
                    await self._publish(
                        event(
                            StepCompleted(
                                step=step,
                                kind="model_turn",
                                summary=action.summary,
                                usage=TokenUsage(input_tokens=action.input_tokens, output_tokens=action.output_tokens),
                            )
                        ),
                        f"{run_id}-step-{step}",
                    )
                    record = StepRecord(step=step, action=action)
                    usage = usage.model_copy(
                        update={
                            "steps": usage.steps + 1,
                            "input_tokens": usage.input_tokens + action.input_tokens,
                            "output_tokens": usage.output_tokens + action.output_tokens,
                        }
                    )
                case ToolCall():
                    record = await self._tool_call(
                        submission, work, feed, step=step, action=action, usage=usage, event=event
                    )
                    usage = usage.model_copy(update={"steps": usage.steps + 1, "tool_calls": usage.tool_calls + 1})
                case Finish():
                    await self._publish(
                        event(RunSucceeded(output=action.output, steps=usage.steps, tool_calls=usage.tool_calls)),
                        f"{run_id}-finished",
                    )
                    log.info("run succeeded", steps=usage.steps, tool_calls=usage.tool_calls)
                    return
                case Fail():
                    await self._publish(
                        event(RunFailed(reason=action.reason, error_type="AgentFailed", steps=usage.steps)),
                        f"{run_id}-finished",
                    )
                    log.info("run failed", reason=action.reason)
                    return
            history.append(record)
        await self._publish(
            event(
                RunFailed(
                    reason=f"the agent took more than {MAX_STEPS} steps", error_type="StepLimit", steps=usage.steps
                )
            ),
            f"{run_id}-finished",
        )

    async def _tool_call(
        self,
        submission: Envelope[Any],
        work: Envelope[RunDispatched],
        feed: RunFeed,
        *,
        step: int,
        action: ToolCall,
        usage: RunUsage,
        event: Any,
    ) -> StepRecord:
        """Ask the gate, wait for its decision, execute only on allow, and record what happened."""
        run_id = work.subject
        tool_call_id = f"{run_id}-tc{step}"
        with consuming(SERVICE, "agent_runner.tool_call", None, run_id=run_id, tool=action.tool, step=step):
            request = make_envelope(
                ToolCallRequested(
                    tool_call_id=tool_call_id,
                    step=step,
                    agent=work.data.agent,
                    tool=action.tool,
                    arguments=dict(action.arguments),
                    usage=usage,
                ),
                # The principal who asked for the run is who asks for its tool calls.
                tenant=work.tenant,
                subject=run_id,
                actor=submission.actor,
                source=SERVICE,
                caused_by=work,
            )
            await self._publish(request, tool_call_id)
            verdict = await feed.decision(tool_call_id, self.settings.decision_timeout_seconds)
            result: Any = None
            error: str | None = None
            outcome: Outcome
            if verdict is None:
                outcome = "refused"
                error = f"no decision within {self.settings.decision_timeout_seconds}s: refused (fail closed)"
            elif verdict.effect != "allow":
                outcome, error = "refused", f"{verdict.effect}: " + "; ".join(verdict.reasons)
            else:
                try:
                    result = await asyncio.wait_for(run_tool(action.tool, action.arguments), TOOL_TIMEOUT_SECONDS)
                    outcome = "ok"
                except ToolError as exc:
                    outcome, error = "error", str(exc)
                except TimeoutError:
                    outcome, error = "error", f"{action.tool} took longer than {TOOL_TIMEOUT_SECONDS}s"
            completed = ToolCallCompleted(
                tool_call_id=tool_call_id,
                step=step,
                tool=action.tool,
                decision_id=verdict.decision_id if verdict else None,
                outcome=outcome,
                result=result,
                error=error,
            )
            await self._publish(event(completed), f"{tool_call_id}-completed")
            log.info("tool call finished", tool=action.tool, outcome=outcome, decision_id=completed.decision_id)
            return StepRecord(step=step, action=action, outcome=completed.outcome, result=result, error=error)


async def heartbeat(message: Msg, every: float) -> None:
    """Tell JetStream the run is still in progress, so it is not handed to another runner."""
    while True:
        await asyncio.sleep(every)
        try:
            await message.in_progress()
        except nats.errors.Error as exc:
            log.warning("heartbeat failed", error=repr(exc))
