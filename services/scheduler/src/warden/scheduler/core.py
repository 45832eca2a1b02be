"""The scheduler's pure core: fold run events into state, and pick which queued runs to dispatch.

The state is rebuilt by folding the events stream from sequence 1 on every start, so the
scheduler keeps nothing of its own: what it decided is in the stream (`run.queued`,
`run.dispatched`) and what finished is too (`run.succeeded`, `run.failed`).
"""

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from warden.messages import DecisionMade, Envelope, RunDispatched, RunFailed, RunQueued, RunSubmitted, RunSucceeded

RunKey = tuple[str, str]  # (tenant, run_id)
WATCHED_TYPES = frozenset({DecisionMade.TYPE, RunQueued.TYPE, RunDispatched.TYPE, RunSucceeded.TYPE, RunFailed.TYPE})


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

    def is_known(self, key: RunKey) -> bool:
        return key in self.queued or key[1] in self.running[key[0]] or key in self.finished


def evolve(state: SchedulerState, envelope: Envelope[Any], headers: Mapping[str, str] | None = None) -> None:
    """Apply one event. Idempotent: the scheduler applies its own events once when it publishes them
    and again when they come back from the stream."""
    key = (envelope.tenant, envelope.entity_id)
    data = envelope.data
    if isinstance(data, DecisionMade):
        if data.request_type == RunSubmitted.TYPE and data.effect == "allow" and not state.is_known(key):
            state.allowed[key] = AllowedRun(data.decision_id, data.request_seq, envelope, dict(headers or {}), data)
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
        state.allowed.pop(key, None)
        state.queued.pop(key, None)
        if key not in state.finished:
            state.running[key[0]].add(key[1])
    elif isinstance(data, RunSucceeded | RunFailed):
        state.allowed.pop(key, None)
        state.queued.pop(key, None)
        state.running[key[0]].discard(key[1])
        state.finished.add(key)


def next_dispatches(state: SchedulerState, tenant_limit: int) -> list[QueuedRun]:
    """Queued runs to dispatch now: most urgent first, then oldest, never over a tenant's limit."""
    free = {
        tenant: tenant_limit - len(state.running[tenant]) for tenant in {run.tenant for run in state.queued.values()}
    }
    chosen = []
    for run in sorted(state.queued.values(), key=lambda run: (run.priority, run.order)):
        if free[run.tenant] > 0:
            free[run.tenant] -= 1
            chosen.append(run)
    return chosen
