"""Executing one run: rebuild it from its own events (`history`), then step the agent, asking before every tool call.

A run's state is never kept anywhere but in the events stream. A runner that takes over a run
(after a crash) reads the run's events first and continues after the last recorded step, so a
recorded step is never repeated. Every publish is keyed, so a repeated one is stored once.
"""

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
import structlog
import tenacity
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import JsonValue

from warden.agent_runner.actions import (
    Action,
    Agent,
    Fail,
    Finish,
    ModelCall,
    ModelTurn,
    Outcome,
    StepRecord,
    ToolCall,
    UnknownAgent,
)
from warden.agent_runner.agents import AgentCatalogue
from warden.agent_runner.approvals import Answered, ApprovalState, Awaiting, Void, approval_state, approver_roles
from warden.agent_runner.budgets import (
    NANOS_PER_USD,
    Amount,
    Budget,
    BudgetExceeded,
    Budgets,
    Ledger,
    RunSpend,
    model_call_estimate,
)
from warden.agent_runner.controls import RunStopped, check_not_stopped, stopped_event
from warden.agent_runner.decision_feed import DecisionFeed
from warden.agent_runner.history import RunHistory, call_facts, url_host, usage_of
from warden.agent_runner.limits import TimeLimits
from warden.agent_runner.llm_agent import LlmAgent, function_name
from warden.agent_runner.mcp_tools import McpToolbox, ToolDefinition, ToolServerError, ToolServersConfig
from warden.agent_runner.model_client import ModelClient, ModelError, ModelPrices, chosen_model
from warden.agent_runner.policy_data import read_policy_data
from warden.agent_runner.tools import BUILTIN_TOOL_SCHEMAS, ToolError, run_tool
from warden.bus import is_stored, retry_transient
from warden.channels import ServiceChannels
from warden.consumers import ordered_subscription
from warden.controls import ControlFeed
from warden.decoding import check_value, recordable_text
from warden.errors import InvalidMessage
from warden.identity import read_seed
from warden.messages import (
    ApprovalRequested,
    AwaitedApproval,
    DecisionMade,
    DecisionRefused,
    Envelope,
    ModelCallRequested,
    Payload,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    RunUsage,
    StepCompleted,
    TenantUsage,
    TokenUsage,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.secret_arguments import SecretArguments, secret_argument_names_of, shipped_policy_dir
from warden.settings import Settings
from warden.signing import DecisionVerifier, arguments_hash, bound_arguments
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.telemetry import consuming, span
from warden.wire import TYPE_HEADER

SERVICE = "agent-runner"
# The most a model's answer may take in its step.completed event: well under a message's 1 MiB
# ceiling, so the turn is always recordable (an answer that could not be stored would be asked
# for again on every attempt of the run).
MAX_RECORDED_MESSAGE_BYTES = 256 * 1024
TOOL_RETRY_FIRST_DELAY_SECONDS = 0.2
TOOL_RETRY_MAX_DELAY_SECONDS = 5.0
HISTORY_TIMEOUT_SECONDS = 5.0
MAX_STEPS = 100

log = structlog.get_logger(__name__)


async def read_history(js: JetStreamContext, subjects: Subjects, stream: str, subject: str) -> RunHistory:
    """Everything the stream holds on one run so far, read with an ordered consumer, then closed."""
    history = RunHistory()
    stored = (await js.stream_info(stream, subjects_filter=subject)).state.messages
    if not stored:
        return history
    caught_up = asyncio.Event()

    async def on_message(message: Msg) -> None:
        if message.metadata.num_pending == 0:
            caught_up.set()
        try:
            envelope = parse_envelope(message.data, type_hint=(message.headers or {}).get(TYPE_HEADER))
            subjects.check_envelope_subject(envelope, message.subject)
        except InvalidMessage:
            return  # not ours to judge: the projector records it; the run's history skips it
        history.apply(envelope)

    subscription = await ordered_subscription(js, [subject], stream, on_message)
    try:
        await asyncio.wait_for(caught_up.wait(), HISTORY_TIMEOUT_SECONDS)
    finally:
        await subscription.unsubscribe()
    return history


@dataclass(frozen=True)
class ExpectedDecision:
    """What a decision on the tool call this runner requested must name to be acted on."""

    tool_call_id: str
    request_seq: int
    request_id: str | None  # None: our publish was a duplicate of an earlier attempt's request
    arguments_hash: str

    def mismatch(self, verdict: DecisionMade) -> str | None:
        """Why a (correctly signed) decision does not answer this request, or None if it does."""
        if verdict.tool_call_id != self.tool_call_id:
            return f"it answers tool call {verdict.tool_call_id!r}, not {self.tool_call_id!r}"
        if verdict.request_seq != self.request_seq:
            return f"it answers request {verdict.request_seq}, not this one ({self.request_seq}): borrowed"
        if self.request_id is not None and verdict.request_id != self.request_id:
            return f"it answers request id {verdict.request_id!r}, not {self.request_id!r}"
        if verdict.arguments_hash != self.arguments_hash:
            return "it was made on other arguments than this call's"
        return _expired(verdict)


def _expired(verdict: DecisionMade) -> str | None:
    if verdict.expires_at is not None and verdict.expires_at <= datetime.now(UTC):
        return f"it expired at {verdict.expires_at.isoformat()}"
    return None


@dataclass(frozen=True)
class RunDeadline:
    """When a run must be done by (wall clock, seconds since the epoch), and what set it."""

    at: float
    seconds: float
    source: str

    def remaining(self) -> float:
        return self.at - time.time()

    def passed(self) -> str | None:
        """Why the run must stop now, or None while it has time left."""
        if self.remaining() > 0:
            return None
        return f"the run passed its deadline of {self.seconds:g}s ({self.source})"


@dataclass(frozen=True)
class RunContext:
    """What every step of one attempt at a run needs: its work item, submission, recorded history and deadline."""

    work: Envelope[RunDispatched]
    submission: Envelope[Any]
    recorded: RunHistory
    deadline: RunDeadline
    spend: RunSpend = field(default_factory=RunSpend)

    def event(self, payload: Payload) -> Envelope[Any]:
        """An event of this run, caused by its work item."""
        return make_envelope(
            payload,
            tenant=self.work.tenant,
            entity_id=self.work.entity_id,
            actor=SERVICE,
            source=SERVICE,
            caused_by=self.work,
        )


def run_decision_mismatch(work: Envelope[RunDispatched], submission: Envelope[Any]) -> str | None:
    """Why the decision a work item carries does not allow this run (None: it does). Signature apart."""
    verdict = work.data.decision
    if verdict is None:
        return "the work item carries no decision"
    if verdict.request_type != RunSubmitted.TYPE or verdict.tool_call_id is not None:
        return f"it is a decision on a {verdict.request_type}, not on the run's submission"
    if verdict.effect != "allow":
        return f"its effect is {verdict.effect}, not allow"
    if verdict.decision_id != work.data.decision_id:
        return f"it is decision {verdict.decision_id!r}, not the work item's {work.data.decision_id!r}"
    if (verdict.request_seq, verdict.request_id) != (work.data.request_seq, submission.id):
        return f"it answers request {verdict.request_seq} ({verdict.request_id}), not the run's submission"
    return _expired(verdict)


class RunExecutor:
    """Runs dispatched work to completion (or failure), publishing every step."""

    def __init__(
        self,
        settings: Settings,
        js: JetStreamContext,
        *,
        catalogue: AgentCatalogue,
        worker: str,
        decisions: DecisionFeed,
        verifier: DecisionVerifier,
        channels: ServiceChannels,
        controls: ControlFeed | None = None,
    ) -> None:
        self.settings = settings
        self.js = js
        self.channels = channels
        self.catalogue = catalogue
        self.worker = worker
        self.verifier = verifier
        # Tool-call ids no one else can predict, the same in every runner (so a runner that takes
        # a run over asks again under the same id, and its request is deduplicated): keyed by a
        # secret every runner holds and no one else does, its NATS seed.
        seed_file = settings.seed_file_for(SERVICE)
        self.tool_call_secret = read_seed(seed_file) if seed_file is not None else secrets.token_bytes(32)
        # What the runner enforces itself, from the same pack as the gate's (until a promote).
        self.use_policy_data(read_policy_data(settings.policy_dir or shipped_policy_dir()))
        self.ledger = Ledger(js, StreamNames.for_prefix(settings.subject_prefix).ledger)
        self.models = ModelClient()
        self.tool_servers = (
            ToolServersConfig.load(settings.tool_servers_file) if settings.tool_servers_file else ToolServersConfig()
        )
        self.toolboxes: dict[str, McpToolbox] = {}
        # Each tenant's MCP tools as last listed: what models are offered, and the digest a call is asked with.
        self.tool_definitions: dict[str, dict[str, ToolDefinition]] = {}
        self.unavailable_tools: set[tuple[str, str]] = set()
        self.decisions = decisions
        self.controls = controls
        self.subjects = Subjects(settings.subject_prefix)
        self.streams = StreamNames.for_prefix(settings.subject_prefix)

    def use_policy_data(self, warden: Mapping[str, Any]) -> None:
        """Enforce `data.warden` of the bundle in force: its secret arguments, prices, limits and budgets.

        Called at start and on every promote or rollback the runner follows; a run under way
        takes the new data from its next step on, as its next decision does from the gate.
        """
        # Keyed by the runners' shared secret, so every runner conceals a value the same way.
        self.secret_arguments = SecretArguments(secret_argument_names_of({"warden": warden}), self.tool_call_secret)
        self.policy_data = dict(warden)
        self.prices = ModelPrices.from_policy_data(warden)
        self.limits = TimeLimits.from_policy_data(warden)
        self.budgets = Budgets.from_policy_data(warden)

    async def _publish(self, envelope: Envelope[Any], key: str) -> PubAck:
        """Store one event or command; a passing bus failure is waited out (the key makes retries safe)."""
        return await self.channels.store(envelope, key)

    def tool_call_id(self, tenant: str, run_id: str, step: int, kind: str = "tc") -> str:
        """The id of a run's call at `step` (`tc`: a tool call, `mc`: a model call)."""
        digest = hmac.new(self.tool_call_secret, f"{tenant}/{run_id}/{step}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}{step}-{digest[:32]}"

    async def _refuse(
        self,
        work: Envelope[RunDispatched],
        decision_id: str,
        reason: str,
        *,
        tool_call_id: str | None = None,
        decision_seq: int | None = None,
    ) -> None:
        """Record, as a security event, a decision this runner will not act on."""
        log.warning(
            "decision refused", decision_id=decision_id, tool_call_id=tool_call_id, reason=reason, seq=decision_seq
        )
        refused = make_envelope(
            DecisionRefused(
                decision_id=decision_id[:256], tool_call_id=tool_call_id, reason=reason, decision_seq=decision_seq
            ),
            tenant=work.tenant,
            entity_id=work.entity_id,
            actor=SERVICE,
            source=SERVICE,
            caused_by=work,
        )
        await self._publish(refused, f"{work.entity_id}-refused-{decision_seq or decision_id}")

    async def _acceptable(
        self, work: Envelope[RunDispatched], expected: ExpectedDecision, verdict: DecisionMade, seq: int | None
    ) -> bool:
        reason = self.verifier.refusal(verdict, work.tenant, work.entity_id) or expected.mismatch(verdict)
        if reason is None:
            return True
        await self._refuse(work, verdict.decision_id, reason, tool_call_id=expected.tool_call_id, decision_seq=seq)
        return False

    async def _may_have_started(self, tenant: str, run_id: str, attempt: int) -> bool:
        """A later attempt may have; a first one has only if its run.started is stored (a duplicate work item)."""
        if attempt > 1:
            return True
        return await is_stored(self.js, self.streams.events, self.subjects.event(tenant, RunStarted, run_id))

    async def _stored_decision(self, work: Envelope[RunDispatched], expected: ExpectedDecision) -> DecisionMade | None:
        """The decision on a tool call looked up in the stream: for one the live feed did not bring.

        Tool calls of a run are made one at a time, so the run's last decision is the one asked for.
        """
        subject = self.subjects.event(work.tenant, DecisionMade, work.entity_id)
        try:
            stored = await retry_transient(
                lambda: self.js.get_last_msg(self.streams.events, subject, direct=True), what="a decision"
            )
            verdict = parse_envelope(stored.data or b"", type_hint=DecisionMade.TYPE).data
        except (nats.js.errors.NotFoundError, InvalidMessage):
            return None
        if not isinstance(verdict, DecisionMade) or verdict.tool_call_id != expected.tool_call_id:
            return None
        return verdict if await self._acceptable(work, expected, verdict, stored.seq) else None

    async def _decision(
        self, work: Envelope[RunDispatched], recorded: RunHistory, expected: ExpectedDecision
    ) -> DecisionMade | None:
        """The gate's decision on this request: one that is signed by a trusted key and names it."""
        for verdict in recorded.decisions.get(expected.tool_call_id, []):
            if await self._acceptable(work, expected, verdict, None):
                return verdict

        async def accept(verdict: DecisionMade, seq: int | None) -> bool:
            return await self._acceptable(work, expected, verdict, seq)

        live = await self.decisions.decision(
            work.entity_id, expected.tool_call_id, self.settings.decision_timeout_seconds, accept
        )
        return live or await self._stored_decision(work, expected)

    async def execute(self, work: Envelope[RunDispatched], headers: Mapping[str, str] | None, attempt: int) -> None:
        tenant, run_id = work.tenant, work.entity_id
        with (
            consuming(SERVICE, "agent_runner.run", headers, run_id=run_id, agent=work.data.agent, attempt=attempt),
            structlog.contextvars.bound_contextvars(run_id=run_id, tenant=tenant),
            self.decisions.tracking(run_id),
        ):
            # A run never started needs no history: its decisions come from the live feed. Any run
            # that may have started (a retry, or a duplicate work item) is rebuilt from all of its
            # events, decisions included.
            started, submission = await asyncio.gather(
                self._may_have_started(tenant, run_id, attempt), self._submission(work)
            )
            history = RunHistory()
            if started:
                history = await retry_transient(
                    lambda: read_history(
                        self.js, self.subjects, self.streams.events, self.subjects.run_events(tenant, run_id)
                    ),
                    what="the run's history",
                )
            if history.finished:
                log.info("run already finished; nothing to do")
                return
            if isinstance(submission, str):
                log.error("the run's submission cannot be used; failing the run", problem=submission)
                failed = RunFailed(reason=submission, error_type="InvalidSubmission")
                envelope = make_envelope(
                    failed, tenant=tenant, entity_id=run_id, actor=SERVICE, source=SERVICE, caused_by=work
                )
                await self._publish(envelope, f"{run_id}-finished")
                return
            # A run starts only on the gate's signed allow of this very submission: a work item
            # that carries none (forged, or altered on the way) starts nothing, on the record.
            verdict = work.data.decision
            refusal = (
                self.verifier.refusal(verdict, tenant, run_id) if verdict is not None else None
            ) or run_decision_mismatch(work, submission)
            if refusal is not None:
                await self._refuse(work, verdict.decision_id if verdict else work.data.decision_id, refusal)
                return
            try:
                await self._run(work, submission, history, attempt)
            except RunStopped as stop:
                await self._publish(stopped_event(work, stop, SERVICE), f"{run_id}-finished")
                log.info("run cancelled", reason=stop.cancelled.reason, control=stop.cancelled.control)

    def _deadline(self, work: Envelope[RunDispatched], submission: Envelope[Any]) -> RunDeadline:
        """Counted from the submission; a submission dated after its own dispatch (a client's clock
        ahead, or a claim to buy time) counts from the dispatch, which the scheduler dated."""
        seconds, source = self.limits.run_deadline(work.data.agent, submission.data.timeout_seconds)
        started = min(submission.time, work.time).timestamp()
        return RunDeadline(at=started + seconds, seconds=seconds, source=source)

    async def _submission(self, work: Envelope[RunDispatched]) -> Envelope[Any] | str:
        """The run.submitted command the work item names, or why it cannot be that run's submission."""
        seq = work.data.request_seq
        try:
            stored = await retry_transient(
                lambda: self.js.get_msg(self.streams.commands, seq, direct=True), what="the run's submission"
            )
            submission = parse_envelope(stored.data or b"", type_hint=(stored.headers or {}).get(TYPE_HEADER))
        except (nats.js.errors.NotFoundError, InvalidMessage) as exc:
            return f"the run's submission (command {seq}) cannot be read: {exc}"
        names_the_run = (submission.tenant, submission.entity_id) == (work.tenant, work.entity_id)
        if not isinstance(submission.data, RunSubmitted) or not names_the_run:
            return f"command {seq} is a {submission.type} of {submission.tenant}/{submission.entity_id}, not this run's"
        return submission

    async def _run(
        self, work: Envelope[RunDispatched], submission: Envelope[Any], recorded: RunHistory, attempt: int
    ) -> None:
        run_id = work.entity_id
        run = RunContext(work=work, submission=submission, recorded=recorded, deadline=self._deadline(work, submission))
        event = run.event
        resume = work.data.resume
        await self._publish(
            event(RunStarted(decision_id=work.data.decision_id, worker=self.worker, attempt=attempt)),
            f"{run_id}-started-{attempt}" if resume == 0 else f"{run_id}-started-r{resume}-{attempt}",
        )
        history = recorded.ordered_steps()
        if history:
            log.info("resuming run", recorded_steps=len(history), attempt=attempt)
            await self._settle_recorded(run, history)
        try:
            agent = self.catalogue.get(work.data.agent)
        except UnknownAgent as exc:
            await self._publish(event(RunFailed(reason=str(exc), error_type="UnknownAgent")), f"{run_id}-finished")
            return

        while len(history) < MAX_STEPS:
            check_not_stopped(self.controls, work)
            step = len(history)
            if (late := run.deadline.passed()) is not None:
                failed = RunFailed(reason=late, error_type="DeadlineExceeded", steps=step)
                await self._publish(event(failed), f"{run_id}-finished")
                log.info("run passed its deadline", reason=late)
                return
            try:
                action = agent.next_action(submission.data.input, history)
            except Exception as exc:  # an agent bug must end the run as failed, not kill the runner
                action = Fail(reason=f"agent {agent.name} raised {type(exc).__name__}: {exc}")
            try:
                records = await self._step(run, agent, action, step=step, history=history)
            except BudgetExceeded as exc:
                failed = RunFailed(reason=f"budget exceeded: {exc}", error_type="BudgetExceeded", steps=step)
                await self._publish(event(failed), f"{run_id}-finished")
                log.info("run stopped by a budget", reason=str(exc))
                return
            if records is None:
                return  # the run ended (or paused) on the record
            history += records
        await self._publish(
            event(
                RunFailed(
                    reason=f"the agent took more than {MAX_STEPS} steps", error_type="StepLimit", steps=len(history)
                )
            ),
            f"{run_id}-finished",
        )

    async def _step(
        self, run: RunContext, agent: Agent, action: Action, *, step: int, history: list[StepRecord]
    ) -> list[StepRecord] | None:
        """Take one action of the agent: the steps it recorded, or None when the run ended or paused."""
        event, run_id = run.event, run.work.entity_id
        usage = usage_of(history)
        match action:
            case ModelTurn():
                completed = StepCompleted(
                    step=step,
                    kind="model_turn",
                    summary=action.summary,
                    usage=TokenUsage(input_tokens=action.input_tokens, output_tokens=action.output_tokens),
                )
                await self._publish(event(completed), f"{run_id}-step-{step}")
                return [StepRecord(step=step, action=action)]
            case ModelCall():
                answered = await self._model_call(run, step=step, action=action, usage=usage, history=history)
                return None if answered is None else [answered]
            case ToolCall():
                calls = _calls_asked_together(agent, run.submission.data.input, history, action)
                done, awaiting = await self._tool_calls(run, step=step, actions=calls, usage=usage, history=history)
                if awaiting:
                    await self._pause(run, awaiting)
                    return None
                return done
            case Finish():
                succeeded = RunSucceeded(output=action.output, steps=usage.steps, tool_calls=usage.tool_calls)
                await self._publish(event(succeeded), f"{run_id}-finished")
                log.info("run succeeded", steps=usage.steps, tool_calls=usage.tool_calls)
            case Fail():
                failed = RunFailed(reason=action.reason, error_type="AgentFailed", steps=usage.steps)
                await self._publish(event(failed), f"{run_id}-finished")
                log.info("run failed", reason=action.reason)
        return None

    async def _reserve(self, run: RunContext, call_id: str, estimate: Amount) -> None:
        """Hold a call's estimate against the run's budget and every shared budget it draws on;
        `BudgetExceeded` (nothing held) when one of them would go over."""
        agent, tenant = run.work.data.agent, run.work.tenant
        limits = self.budgets.run(agent)
        if limits is not None and (over := limits.overdrawn(run.spend.amount + estimate)) is not None:
            raise BudgetExceeded(f"the run's budget would reach {over}")
        held: list[Budget] = []
        for budget in self.budgets.shared(tenant, agent):
            refusal = await self.ledger.reserve(budget, call_id, estimate)
            if refusal is not None:
                for taken in held:
                    await self.ledger.settle(taken, call_id, Amount())
                raise BudgetExceeded(refusal)
            held.append(budget)

    async def _tenant_usage(self, run: RunContext) -> TenantUsage | None:
        """What the run's tenant has spent (and holds) of its budget, for the policy; None without one."""
        budget = self.budgets.tenant(run.work.tenant)
        if budget is None:
            return None
        balance, _ = await self.ledger.balance(budget.key)
        spent = balance.committed()
        return TenantUsage(
            tokens=spent.tokens, cost_usd=spent.cost_nanousd / NANOS_PER_USD, tool_calls=spent.tool_calls
        )

    async def _settle(self, run: RunContext, call_id: str, used: Amount) -> None:
        """Replace a call's held estimate by what it used, in the run's spend and every shared budget."""
        run.spend.amount = run.spend.amount + used
        for budget in self.budgets.shared(run.work.tenant, run.work.data.agent):
            await self.ledger.settle(budget, call_id, used)

    async def _settle_recorded(self, run: RunContext, history: list[StepRecord]) -> None:
        """Count what the recorded calls used towards the run's budget, and settle any hold an earlier
        attempt left on a shared budget (a runner that died between a call and its settlement)."""
        work = run.work
        shared = self.budgets.shared(work.tenant, work.data.agent)
        for record in history:
            used = self._used(record)
            if used is None:
                continue
            run.spend.amount = run.spend.amount + used
            kind = "tc" if isinstance(record.action, ToolCall) else "mc"
            call_id = self.tool_call_id(work.tenant, work.entity_id, record.step, kind)
            for budget in shared:
                await self.ledger.settle(budget, call_id, used)

    def _used(self, record: StepRecord) -> Amount | None:
        """What a recorded call used (None: the step was no call: a scripted model turn)."""
        action = record.action
        if isinstance(action, ToolCall):
            return self.budgets.tool_call(action.tool) if record.outcome in ("ok", "error") else Amount()
        if action.model is None:
            return None
        tokens = action.input_tokens + action.output_tokens
        return Amount(tokens=tokens, cost_nanousd=round(action.cost_usd * NANOS_PER_USD))

    async def _ask_gate(
        self, run: RunContext, request: ToolCallRequested | ModelCallRequested, call_id: str
    ) -> DecisionMade | None:
        """Store the request for a call and wait for the gate's decision on it (None: none came in time)."""
        envelope = make_envelope(
            request,
            # The principal who asked for the run is who asks for its calls.
            tenant=run.work.tenant,
            entity_id=run.work.entity_id,
            actor=run.submission.actor,
            source=SERVICE,
            caused_by=run.work,
        )
        check_not_stopped(self.controls, run.work)  # no call starts once its run is stopped
        stored = await self._publish(envelope, call_id)
        expected = ExpectedDecision(
            tool_call_id=call_id,
            request_seq=stored.seq,
            request_id=None if stored.duplicate else envelope.id,
            arguments_hash=arguments_hash(bound_arguments(request)),
        )
        return await self._decision(run.work, run.recorded, expected)

    def _toolbox(self, tenant: str) -> McpToolbox:
        toolbox = self.toolboxes.get(tenant)
        if toolbox is None:
            toolbox = self.toolboxes[tenant] = McpToolbox.for_tenant(self.tool_servers, tenant)
        return toolbox

    def _is_mcp_tool(self, tenant: str, tool: str) -> bool:
        return tool.partition(".")[0] in self._toolbox(tenant).server_names

    async def _list_mcp_tools(self, tenant: str) -> dict[str, ToolDefinition]:
        """The tenant's MCP tools as their servers describe them now (kept for the calls that follow)."""
        toolbox = self._toolbox(tenant)
        if not toolbox.server_names:
            return {}
        definitions, failures = await toolbox.listing()
        for failure in failures.values():
            # Its tools are not offered; a call to one is asked with no digest, which the policy refuses.
            log.warning("cannot list an MCP server's tools", tenant=tenant, error=str(failure))
        listed = {definition.name: definition for definition in definitions}
        self.tool_definitions[tenant] = listed
        return listed

    async def _tool_digest(self, tenant: str, tool: str) -> str | None:
        """The digest of an MCP tool's definition as last listed (listed now if it never was); None otherwise."""
        if not self._is_mcp_tool(tenant, tool):
            return None
        known = self.tool_definitions.get(tenant, {})
        if tool not in known:
            known = await self._list_mcp_tools(tenant)
        definition = known.get(tool)
        return definition.digest if definition else None

    async def _offered_tools(self, tenant: str, names: tuple[str, ...]) -> list[dict[str, Any]]:
        """The tools a model is offered, in the Chat Completions format, with their schemas."""
        mcp_tools = await self._list_mcp_tools(tenant) if any(self._is_mcp_tool(tenant, name) for name in names) else {}
        offered = []
        for name in names:
            if name in BUILTIN_TOOL_SCHEMAS:
                description, parameters = BUILTIN_TOOL_SCHEMAS[name]
            elif name in mcp_tools:
                description, parameters = mcp_tools[name].description, mcp_tools[name].input_schema
            else:
                if (tenant, name) not in self.unavailable_tools:  # once, not on every model call
                    self.unavailable_tools.add((tenant, name))
                    log.warning(
                        "a tool the agent offers is not available here; the model is not told of it",
                        tool=name,
                        tenant=tenant,
                    )
                continue
            offered.append(
                {
                    "type": "function",
                    "function": {"name": function_name(name), "description": description, "parameters": parameters},
                }
            )
        return offered

    async def _model_call(
        self, run: RunContext, *, step: int, action: ModelCall, usage: RunUsage, history: list[StepRecord]
    ) -> StepRecord | None:
        """Ask the gate, call the model only on allow, and record its turn; None when the run ended instead."""
        work, deadline, event = run.work, run.deadline, run.event
        run_id = work.entity_id
        call_id = self.tool_call_id(work.tenant, run_id, step, kind="mc")
        action = replace(action, model=chosen_model(action))
        request = ModelCallRequested(
            call_id=call_id,
            step=step,
            agent=work.data.agent,
            model=action.model,
            max_output_tokens=action.max_output_tokens,
            usage=usage,
            history=call_facts(history),
            tenant_usage=await self._tenant_usage(run),
        )
        verdict = await self._ask_gate(run, request, call_id)
        if verdict is None or verdict.effect != "allow":
            reason = (
                f"no decision within {self.settings.decision_timeout_seconds}s (fail closed)"
                if verdict is None
                else f"{verdict.effect}: " + "; ".join(verdict.reasons)
            )
            failed = RunFailed(reason=f"model call refused: {reason}", error_type="ModelCallRefused", steps=usage.steps)
            await self._publish(event(failed), f"{run_id}-finished")
            log.info("model call refused; run failed", model=action.model, reason=reason)
            return None
        check_not_stopped(self.controls, work)  # a stop that came while the gate decided (before anything is held)
        estimate = model_call_estimate(self.prices, action.model, action.messages, action.max_output_tokens)
        await self._reserve(run, call_id, estimate)
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": action.model,
            "gen_ai.request.max_tokens": action.max_output_tokens,
            "gen_ai.request.temperature": action.temperature,
            "warden.run_id": run_id,
            "warden.decision_id": verdict.decision_id,
        }
        with span(SERVICE, f"chat {action.model}", attributes, client=True) as model_span:
            try:
                offered = await self._offered_tools(work.tenant, action.tools)
                reply = await asyncio.wait_for(self.models.complete(action, offered), max(deadline.remaining(), 0))
            except TimeoutError:
                await self._settle(run, call_id, Amount())
                late = deadline.passed() or f"the run's deadline of {deadline.seconds:g}s came during the model call"
                failed = RunFailed(reason=late, error_type="DeadlineExceeded", steps=usage.steps)
                await self._publish(event(failed), f"{run_id}-finished")
                return None
            except ModelError as exc:
                # A failed call is charged nothing: what the endpoint may have spent on it is unknown.
                await self._settle(run, call_id, Amount())
                model_span.set_attribute("error.type", type(exc.__cause__ or exc).__name__)
                failed = RunFailed(reason=recordable_text(str(exc), 2000), error_type="ModelError", steps=usage.steps)
                await self._publish(event(failed), f"{run_id}-finished")
                log.info("model call failed; run failed", model=action.model, error=str(exc))
                return None
            recorded_size = len(json.dumps(reply.message, ensure_ascii=False).encode())
            if recorded_size > MAX_RECORDED_MESSAGE_BYTES:
                reason = (
                    f"the model's answer is {recorded_size} bytes, over the {MAX_RECORDED_MESSAGE_BYTES} a turn may "
                    "record: lower the agent's max_output_tokens"
                )
                failed = RunFailed(reason=reason, error_type="ModelError", steps=usage.steps)
                await self._publish(event(failed), f"{run_id}-finished")
                return None
            model_span.set_attribute("gen_ai.response.model", reply.response_model)
            model_span.set_attribute("gen_ai.usage.input_tokens", reply.input_tokens)
            model_span.set_attribute("gen_ai.usage.output_tokens", reply.output_tokens)
            if reply.finish_reason:
                model_span.set_attribute("gen_ai.response.finish_reasons", [reply.finish_reason])
        cost = self.prices.cost_usd(action.model, reply.input_tokens, reply.output_tokens)
        used = Amount(tokens=reply.input_tokens + reply.output_tokens, cost_nanousd=round(cost * NANOS_PER_USD))
        await self._settle(run, call_id, used)
        content = reply.message.get("content")
        turn = ModelTurn(
            summary=_summary(content, reply.message),
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            model=action.model,
            cost_usd=cost,
            finish_reason=reply.finish_reason,
            message=reply.message,
        )
        completed = StepCompleted(
            step=step,
            kind="model_turn",
            summary=turn.summary,
            usage=TokenUsage(input_tokens=reply.input_tokens, output_tokens=reply.output_tokens),
            model=action.model,
            decision_id=verdict.decision_id,
            cost_usd=cost,
            finish_reason=reply.finish_reason,
            message=reply.message,
        )
        await self._publish(event(completed), f"{run_id}-step-{step}")
        log.info(
            "model turn recorded",
            model=action.model,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost_usd=cost,
            tool_calls=len(reply.message.get("tool_calls") or []),  # type: ignore[arg-type]
        )
        return StepRecord(step=step, action=turn)

    async def _tool_calls(
        self, run: RunContext, *, step: int, actions: list[ToolCall], usage: RunUsage, history: list[StepRecord]
    ) -> tuple[list[StepRecord], list[AwaitedApproval]]:
        """Ask the gate about calls made together (at `step` on), then run them in order, each only on allow.

        Every call is asked about first, with the history before them all. Those that need a human
        stop the run there: the calls before the first of them run and are recorded, and every call
        that awaits approval gets its `approval.requested`, so several of one run may await at once.
        Returns what ran (in order) and what awaits approval (empty when nothing does).
        """
        work = run.work
        facts = call_facts(history)
        tenant_usage = await self._tenant_usage(run)
        asks = []
        for offset, action in enumerate(actions):
            call_id = self.tool_call_id(work.tenant, work.entity_id, step + offset)
            request = None
            if action.invalid is None:
                # What may be recorded: the arguments policy data marks secret only as a keyed hash. The
                # request, the gate's input and the decision's binding all see this; the tool the clear ones.
                request = ToolCallRequested(
                    tool_call_id=call_id,
                    step=step + offset,
                    agent=work.data.agent,
                    tool=action.tool,
                    arguments=self.secret_arguments.conceal(action.tool, action.arguments),
                    usage=usage.model_copy(
                        update={"steps": usage.steps + offset, "tool_calls": usage.tool_calls + offset}
                    ),
                    history=facts,
                    tool_digest=await self._tool_digest(work.tenant, action.tool),
                    tenant_usage=tenant_usage,
                )
            asks.append((call_id, action, request))
        asked = [(call_id, request) for call_id, _, request in asks if request is not None]
        verdicts = await asyncio.gather(*(self._verdict(run, request, call_id) for call_id, request in asked))
        verdict_of = dict(zip((call_id for call_id, _ in asked), verdicts, strict=True))
        awaiting = [
            (call_id, request, verdict)
            for (call_id, request), verdict in zip(asked, verdicts, strict=True)
            if isinstance(verdict, Awaiting)
        ]
        waiting_ids = {call_id for call_id, _, _ in awaiting}
        done = []
        for offset, (call_id, action, _) in enumerate(asks):
            if call_id in waiting_ids:
                break  # calls after one that waits run once it is answered, in order
            done.append(await self._finish_call(run, step + offset, call_id, action, verdict_of.get(call_id)))
        for _, request, verdict in awaiting:
            await self._request_approval(run, request, verdict.asked)
        return done, [
            AwaitedApproval(
                approval_id=verdict.asked.decision_id,
                tool_call_id=call_id,
                expires_at=verdict.asked.expires_at or datetime.now(UTC),
            )
            for call_id, _, verdict in awaiting
        ]

    async def _verdict(
        self, run: RunContext, request: ToolCallRequested, call_id: str
    ) -> DecisionMade | ApprovalState | None:
        """What a call may do: the gate's decision on it (None: none came in time), or, for a call
        that needed approval, where its approval stands.

        A call with a recorded require_approval decision is never asked again: its answers are
        decisions on it too, recorded in the run's history.
        """
        bound = arguments_hash(bound_arguments(request))
        work = run.work
        signed = [
            decision
            for decision in run.recorded.decisions.get(call_id, [])
            if decision.arguments_hash == bound and self.verifier.refusal(decision, work.tenant, work.entity_id) is None
        ]
        recorded = approval_state(signed, datetime.now(UTC))
        if recorded is not None:
            return recorded
        # Decided before this attempt (a run resumed after a pause or a crash): asking again could
        # store a second request once the duplicate window has passed.
        for decision in signed:
            if decision.request_type == ToolCallRequested.TYPE and _expired(decision) is None:
                return decision
        verdict = await self._ask_gate(run, request, call_id)
        if verdict is not None and verdict.effect == "require_approval":
            return approval_state([verdict], datetime.now(UTC)) or verdict
        return verdict

    async def _request_approval(self, run: RunContext, request: ToolCallRequested, asked: DecisionMade) -> None:
        """Record what a human is asked to approve: the call, its arguments as recorded, who may answer, until when."""
        assert asked.arguments_hash is not None
        assert asked.expires_at is not None
        requested = ApprovalRequested(
            approval_id=asked.decision_id,
            tool_call_id=request.tool_call_id,
            step=request.step,
            agent=request.agent,
            tool=request.tool,
            arguments=request.arguments,
            arguments_hash=asked.arguments_hash,
            policy_revision=asked.policy_revision,
            requested_by=run.submission.actor,
            approver_roles=approver_roles(self.policy_data, request.tool),
            expires_at=asked.expires_at,
            reasons=asked.reasons,
            decision=asked,
        )
        await self._publish(run.event(requested), f"{request.tool_call_id}-approval")
        log.info("tool call awaits approval", tool=request.tool, approval_id=asked.decision_id)

    async def _pause(self, run: RunContext, awaiting: list[AwaitedApproval]) -> None:
        """Put the run aside: nothing of it stays here; the scheduler dispatches it again once answered."""
        resume = run.work.data.resume
        reason = f"{len(awaiting)} tool call(s) await approval"
        await self._publish(
            run.event(RunPaused(reason=reason, awaiting=awaiting, resume=resume)),
            f"{run.work.entity_id}-paused-{resume}",
        )
        log.info("run paused", awaiting=[waiting.approval_id for waiting in awaiting])

    async def _finish_call(
        self,
        run: RunContext,
        step: int,
        tool_call_id: str,
        action: ToolCall,
        verdict: DecisionMade | ApprovalState | None,
    ) -> StepRecord:
        """Execute one call as its verdict allows (or not) and record what happened."""
        work = run.work
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": action.tool,
            "gen_ai.tool.call.id": tool_call_id,
            "warden.run_id": work.entity_id,
            "warden.step": step,
        }
        with span(SERVICE, f"execute_tool {action.tool}", attributes) as tool_span:
            result: Any = None
            error: str | None = None
            outcome: Outcome
            decision_id: str | None = None
            over: BudgetExceeded | None = None
            if action.invalid is not None:
                # Nothing can run, so nothing was asked: the agent is told why, on the record.
                outcome, error = "error", recordable_text(action.invalid, 2000)
            elif isinstance(verdict, Void):
                outcome, error, decision_id = "refused", f"approval void: {verdict.reason}", verdict.decision_id
            else:
                decision = verdict.decision if isinstance(verdict, Answered) else verdict
                assert not isinstance(decision, Awaiting)
                decision_id = decision.decision_id if decision else None
                allowed = decision is not None and decision.effect == "allow"
                charge = self.budgets.tool_call(action.tool)
                check_not_stopped(self.controls, work)  # a stop that came while the gate decided
                try:
                    if allowed:
                        await self._reserve(run, tool_call_id, charge)
                except BudgetExceeded as exc:
                    over = exc
                    outcome, error = "refused", f"budget exceeded: {exc}"
                else:
                    outcome, result, error = await self._execute(
                        work.tenant, action, decision, run.deadline, tool_call_id
                    )
                    if allowed:
                        await self._settle(run, tool_call_id, charge if outcome != "refused" else Amount())
            tool_span.set_attribute("warden.outcome", outcome)
            if outcome != "ok":
                tool_span.set_attribute("error.type", outcome)
            completed = ToolCallCompleted(
                tool_call_id=tool_call_id,
                step=step,
                tool=action.tool,
                decision_id=decision_id,
                outcome=outcome,
                result=result,
                error=error,
                host=url_host(action.arguments),
            )
            await self._publish(run.event(completed), f"{tool_call_id}-completed")
            log.info("tool call finished", tool=action.tool, outcome=outcome, decision_id=completed.decision_id)
            if over is not None:
                raise over  # the run ends here, on the record
            approved = isinstance(verdict, Answered) and verdict.decision.effect == "allow" and outcome != "refused"
            return StepRecord(
                step=step,
                action=action,
                outcome=completed.outcome,
                result=result,
                error=error,
                host=completed.host,
                approved=approved,
            )

    async def _execute(
        self, tenant: str, action: ToolCall, verdict: DecisionMade | None, deadline: RunDeadline, idempotency_key: str
    ) -> tuple[Outcome, Any, str | None]:
        """Run the tool if, and only if, the decision allows it: its outcome, result and error.

        A tool the policy data gives `retries` is tried again, with backoff, after a failure that
        may pass (see `_may_pass`); any other failure is recorded at once and handed to the agent.
        """
        if verdict is None:
            waited = self.settings.decision_timeout_seconds
            return "refused", None, f"no decision within {waited}s: refused (fail closed)"
        if verdict.effect != "allow":
            return "refused", None, f"{verdict.effect}: " + "; ".join(verdict.reasons)
        retries = self.limits.retries(action.tool)
        tries = 0
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_may_pass),
            # Capped exponential backoff with jitter, and never past the run's deadline.
            wait=tenacity.wait_exponential_jitter(
                multiplier=TOOL_RETRY_FIRST_DELAY_SECONDS, max=TOOL_RETRY_MAX_DELAY_SECONDS
            ),
            stop=tenacity.stop_after_attempt(retries + 1) | tenacity.stop_before_delay(max(deadline.remaining(), 0)),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    tries += 1
                    result = await self._attempt(tenant, action, deadline, idempotency_key)
        except ToolError as exc:
            return "error", None, recordable_text(_tried(str(exc), tries), 2000)
        except InvalidMessage as exc:
            return "error", None, f"{action.tool} returned what cannot be recorded: {exc}"
        except ToolTimeout as exc:
            return "error", None, _tried(str(exc), tries)
        return "ok", result, None

    async def _attempt(self, tenant: str, action: ToolCall, deadline: RunDeadline, idempotency_key: str) -> JsonValue:
        """One try at a tool call, bounded by the tool's timeout from the policy data, or by what is
        left of the run's deadline when that is sooner. Every try carries the same idempotency key
        (the tool call's id), so a server that honours it does the call's side effect once."""
        timeout = self.limits.tool_timeout(action.tool)
        bound = f"its timeout of {timeout:g}s"
        if deadline.remaining() < timeout:
            timeout = max(deadline.remaining(), 0)
            bound = f"what was left of the run's deadline ({timeout:.3g}s)"
        try:
            if self._is_mcp_tool(tenant, action.tool):
                # Also bounded by the server's own timeout_seconds (and a hung server's session is dropped).
                call = self._toolbox(tenant).call(action.tool, action.arguments, idempotency_key=idempotency_key)
                result = await asyncio.wait_for(call, timeout)
            else:
                result = await asyncio.wait_for(run_tool(action.tool, action.arguments), timeout)
        except TimeoutError as exc:
            raise ToolTimeout(f"{action.tool} took longer than {bound}") from exc
        # What cannot be recorded cannot be the result: every reader would refuse the event.
        check_value(result)
        return result


# The most tool calls of one model turn asked about together.
MAX_CALLS_ASKED_TOGETHER = 16


def _calls_asked_together(
    agent: Agent, run_input: Mapping[str, JsonValue], history: list[StepRecord], first: ToolCall
) -> list[ToolCall]:
    """The calls to ask the gate about at once: every call still to make of an `llm` agent's last
    turn (the model asked for them together), else the one call. A scripted agent's next calls
    wait for this one's result: the policy must see it before it judges them."""
    if isinstance(agent, LlmAgent):
        pending = agent.pending_tool_calls(run_input, history)
        if pending and pending[0] == first:
            return pending[:MAX_CALLS_ASKED_TOGETHER]
    return [first]


class ToolTimeout(Exception):
    """One try at a tool call ran out of time (the message says which bound); it may pass if tried again."""


def _may_pass(error: BaseException) -> bool:
    """Whether trying a tool call again may succeed: it ran out of time, or its server was unreachable or crashed."""
    return isinstance(error, ToolTimeout) or (isinstance(error, ToolServerError) and error.transient)


def _tried(error: str, tries: int) -> str:
    return error if tries <= 1 else f"{error} (tried {tries} times)"


def _summary(content: Any, message: Mapping[str, Any]) -> str:
    """One line for the timeline: the start of what the model said, or the tools it asked for."""
    calls = message.get("tool_calls") or []
    if calls:
        names = ", ".join(str(call.get("function", {}).get("name")) for call in calls if isinstance(call, dict))
        return f"asks for {len(calls)} tool call(s): {names}"[:500]
    if message.get("refusal"):
        return f"refuses: {message['refusal']}"[:500]
    return (content if isinstance(content, str) else "")[:500]
