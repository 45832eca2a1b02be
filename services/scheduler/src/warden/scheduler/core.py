"""The scheduler's pure core: fold run events into state, and pick which queued runs to dispatch.

The state is rebuilt by folding the events stream from sequence 1 on every start, so the
scheduler keeps nothing of its own: what it decided is in the stream (`run.queued`,
`run.dispatched`, `run.resumed`) and what finished or paused is too (`run.succeeded`,
`run.failed`, `run.cancelled`, `run.paused`, and the decisions on answers to approval requests).
Cancels and halts come from a view of their own (warden.controls), folded from sequence 1.

A paused run holds no slot. It is resumed (queued again, then dispatched under the tenant's
limit like any run) once every tool call it awaits has an answer that counts, or once the
first of their approvals has expired, so that the runner records that call as refused.
"""

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from warden.controls import Control, ControlView
from warden.messages import (
    ApprovalAnswered,
    DecisionMade,
    Envelope,
    RunCancelled,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunQueued,
    RunResumed,
    RunSubmitted,
    RunSucceeded,
)

RunKey = tuple[str, str]  # (tenant, run_id)
WATCHED_TYPES = frozenset(
    {
        DecisionMade.TYPE,
        RunQueued.TYPE,
        RunDispatched.TYPE,
        RunSucceeded.TYPE,
        RunFailed.TYPE,
        RunPaused.TYPE,
        RunResumed.TYPE,
        RunCancelled.TYPE,
    }
)
# An approval is taken as expired this long after its expiry, so that a runner whose clock is a
# little behind the scheduler's sees it expired too (and does not pause the run again).
EXPIRY_GRACE = timedelta(seconds=1)


@dataclass
class QueuedRun:
    tenant: str
    run_id: str
    agent: str
    priority: int
    decision_id: str
    request_seq: int
    order: int  # arrival order: first come, first served within a priority
    cause: Envelope[Any]  # the run.queued event: what a dispatch is caused by
    trace_headers: Mapping[str, str] = field(default_factory=dict)
    decision: DecisionMade | None = None  # the gate's signed allow, handed on to the runner
    resume: int = 0  # 0 for a first dispatch, n for the n-th resume


@dataclass
class PausedRun:
    """A run put aside until the tool calls it awaits are answered (or their approval expires)."""

    run: QueuedRun  # what dispatching it again needs
    awaiting: dict[str, datetime]  # tool call id -> when its approval expires
    cause: Envelope[Any]  # the run.paused event: what its resume is caused by

    def due(self, now: datetime) -> bool:
        return not self.awaiting or min(self.awaiting.values()) + EXPIRY_GRACE <= now


@dataclass
class AllowedRun:
    """An allowed run not yet queued: the scheduler still has to read its submission."""

    decision_id: str
    request_seq: int
    cause: Envelope[Any]  # the decision: what queueing the run is caused by
    trace_headers: Mapping[str, str]
    decision: DecisionMade | None = None


@dataclass
class SchedulerState:
    allowed: dict[RunKey, AllowedRun] = field(default_factory=dict)
    queued: dict[RunKey, QueuedRun] = field(default_factory=dict)
    running: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    finished: set[RunKey] = field(default_factory=set)
    arrivals: int = 0
    # What each dispatched run was queued as, so a paused one can be dispatched again.
    dispatched: dict[RunKey, QueuedRun] = field(default_factory=dict)
    paused: dict[RunKey, PausedRun] = field(default_factory=dict)
    # The tool calls of runs in play whose approval has an answer that counts (it may come
    # before the run.paused event that says the run waits for it).
    answered: defaultdict[RunKey, set[str]] = field(default_factory=lambda: defaultdict(set))

    def is_known(self, key: RunKey) -> bool:
        return key in self.queued or key[1] in self.running[key[0]] or key in self.finished or key in self.paused

    def forget(self, key: RunKey) -> None:
        self.allowed.pop(key, None)
        self.queued.pop(key, None)
        self.paused.pop(key, None)
        self.dispatched.pop(key, None)
        self.answered.pop(key, None)
        self.running[key[0]].discard(key[1])


def evolve(state: SchedulerState, envelope: Envelope[Any], headers: Mapping[str, str] | None = None) -> None:
    """Apply one event. Idempotent: the scheduler applies its own events once when it publishes them
    and again when they come back from the stream."""
    key = (envelope.tenant, envelope.entity_id)
    data = envelope.data
    if isinstance(data, DecisionMade):
        _decided(state, key, envelope, data, headers)
    elif isinstance(data, RunQueued):
        state.allowed.pop(key, None)
        if not state.is_known(key):
            state.arrivals += 1
            state.queued[key] = QueuedRun(
                key[0],
                key[1],
                data.agent,
                data.priority,
                data.decision_id,
                data.request_seq,
                state.arrivals,
                envelope,
                dict(headers or {}),
                data.decision,
            )
    elif isinstance(data, RunDispatched):
        _dispatched(state, key, envelope, data)
    elif isinstance(data, RunPaused):
        state.running[key[0]].discard(key[1])
        run = state.dispatched.get(key)
        if run is not None and key not in state.finished:
            answered = state.answered[key]
            awaiting = {
                call.tool_call_id: call.expires_at for call in data.awaiting if call.tool_call_id not in answered
            }
            state.paused[key] = PausedRun(replace(run, resume=data.resume), awaiting, envelope)
    elif isinstance(data, RunResumed):
        paused = state.paused.pop(key, None)
        if paused is not None:
            state.queued[key] = replace(paused.run, resume=data.resume, cause=envelope, decision=data.decision)
    elif isinstance(data, RunSucceeded | RunFailed | RunCancelled):
        state.forget(key)
        state.finished.add(key)


def _decided(
    state: SchedulerState, key: RunKey, envelope: Envelope[Any], data: DecisionMade, headers: Mapping[str, str] | None
) -> None:
    if data.request_type == RunSubmitted.TYPE and data.effect == "allow" and not state.is_known(key):
        state.allowed[key] = AllowedRun(data.decision_id, data.request_seq, envelope, dict(headers or {}), data)
    elif data.request_type == ApprovalAnswered.TYPE and data.effect in ("allow", "deny") and data.tool_call_id:
        # An answer that counts: the call no longer waits (the runner acts on it, or refuses it).
        state.answered[key].add(data.tool_call_id)
        if key in state.paused:
            state.paused[key].awaiting.pop(data.tool_call_id, None)


def _dispatched(state: SchedulerState, key: RunKey, envelope: Envelope[Any], data: RunDispatched) -> None:
    state.allowed.pop(key, None)
    queued = state.queued.pop(key, None)
    if key in state.finished:
        return
    state.running[key[0]].add(key[1])
    if queued is not None:
        state.dispatched[key] = queued
    elif key not in state.dispatched:  # queued before the fold's start: its priority is not known here
        state.dispatched[key] = QueuedRun(
            key[0], key[1], data.agent, 5, data.decision_id, data.request_seq, 0, envelope, decision=data.decision
        )


def due_resumes(state: SchedulerState, now: datetime) -> list[PausedRun]:
    """Paused runs to queue again now: nothing they await is unanswered, or an approval has expired."""
    return [paused for paused in state.paused.values() if paused.due(now)]


@dataclass(frozen=True)
class Stopped:
    """A run the scheduler ends before it starts (or starts again): it was cancelled."""

    tenant: str
    run_id: str
    control: Control
    cause: Envelope[Any]  # what its run.cancelled is caused by
    trace_headers: Mapping[str, str]


def cancelled_runs(state: SchedulerState, controls: ControlView) -> list[Stopped]:
    """Runs not under way that a cancel names: allowed, queued or paused, they end here and never start.

    A halt cancels none of them: it holds queued runs (see `next_dispatches`) until it is lifted.
    """
    stopped = []
    waiting: list[tuple[RunKey, AllowedRun | QueuedRun]] = [*state.allowed.items(), *state.queued.items()]
    for key, run in waiting:
        if (cancel := controls.cancels.get(key)) is not None:
            stopped.append(Stopped(key[0], key[1], cancel, run.cause, run.trace_headers))
    for key, paused in state.paused.items():
        if (cancel := controls.cancels.get(key)) is not None:
            stopped.append(Stopped(key[0], key[1], cancel, paused.cause, paused.run.trace_headers))
    return stopped


def next_dispatches(state: SchedulerState, tenant_limit: int, controls: ControlView | None = None) -> list[QueuedRun]:
    """Queued runs to dispatch now: most urgent first, then oldest, never over a tenant's limit.

    A run in a halted scope is held: it keeps its place and takes no slot until the halt is lifted.
    """
    free = {
        tenant: tenant_limit - len(state.running[tenant]) for tenant in {run.tenant for run in state.queued.values()}
    }
    chosen = []
    for run in sorted(state.queued.values(), key=lambda run: (run.priority, run.order)):
        if controls is not None and controls.halt_over(run.tenant, run.agent) is not None:
            continue
        if free[run.tenant] > 0:
            free[run.tenant] -= 1
            chosen.append(run)
    return chosen
