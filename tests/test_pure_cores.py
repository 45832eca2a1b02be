"""The pure cores, with no server: the scheduler's fold, the run-history fold, the gate's policy input
and decision rules, and the projection of stored messages into rows.

The suite against real NATS and Postgres is the evidence that the system works; these pin each
core's rules down where a failure names the rule, and run in milliseconds.
"""

import itertools
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import tenants
from warden.admission import CommandRules
from warden.agent_runner.actions import ModelTurn, ToolCall
from warden.agent_runner.history import RunHistory
from warden.audit_projector.projection import Rows, StoredMessage, project
from warden.credentials import SERVICE_SECRETS, CredentialStore, CredentialStoreError, hand_out, private_credentials
from warden.messages import (
    DecisionMade,
    Effect,
    Envelope,
    ModelCallRequested,
    Payload,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    RunUsage,
    StepCompleted,
    TokenUsage,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
)
from warden.permissions import Role
from warden.policy_gate.decide import POLICY_BUDGET_MS, PolicyDecider, policy_input
from warden.policy_gate.engine import PolicyEngine, PolicyEvaluationError, PolicyResult
from warden.scheduler.core import SchedulerState, evolve, next_dispatches
from warden.signing import (
    EVIDENCE_KEY_FILE,
    EVIDENCE_KEYS_FILE,
    DecisionBinding,
    DecisionSigner,
    DecisionVerifier,
    Signer,
    TrustedKeys,
    arguments_hash,
)
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import message_headers

PREFIX = "pure"
SUBJECTS = Subjects(PREFIX)
STREAMS = StreamNames.for_prefix(PREFIX)
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def event(data: Payload, run_id: str, tenant: str = "acme", actor: str = "alice") -> Envelope[Any]:
    return make_envelope(data, tenant=tenant, entity_id=run_id, actor=actor, source="test")


def allow(run_id: str, tenant: str = "acme", effect: Effect = "allow", seq: int = 1) -> Envelope[Any]:
    decision = DecisionMade(
        decision_id=f"d-{run_id}",
        request_type=RunSubmitted.TYPE,
        request_id=f"c-{run_id}",
        request_seq=seq,
        effect=effect,
        policy_revision="sha256:test",
        evaluation_ms=0.1,
    )
    return event(decision, run_id, tenant)


def tool_decision(tool_call_id: str, effect: Effect = "allow") -> DecisionMade:
    return DecisionMade(
        decision_id="d2",
        request_type=ToolCallRequested.TYPE,
        request_id="c2",
        request_seq=2,
        effect=effect,
        policy_revision="r",
        evaluation_ms=0.1,
        tool_call_id=tool_call_id,
    )


def queued(run_id: str, tenant: str = "acme", priority: int = 5, seq: int = 1) -> Envelope[Any]:
    return event(RunQueued(decision_id=f"d-{run_id}", priority=priority, agent="demo", request_seq=seq), run_id, tenant)


def dispatched(run_id: str, tenant: str = "acme") -> Envelope[Any]:
    return event(RunDispatched(decision_id=f"d-{run_id}", agent="demo", request_seq=1), run_id, tenant)


def succeeded(run_id: str, tenant: str = "acme") -> Envelope[Any]:
    return event(RunSucceeded(steps=1, tool_calls=0), run_id, tenant)


# --- scheduler fold ---------------------------------------------------------------------------

# One run's life as the scheduler sees it, cut short at any point.
LIFE = ("allowed", "queued", "dispatched", "finished")


@st.composite
def histories(draw: st.DrawFn) -> list[Envelope[Any]]:
    """Events of several runs over two tenants, each run's in order, interleaved across runs."""
    lives = []
    for index in range(draw(st.integers(1, 12))):
        run_id, tenant = f"r{index}", draw(st.sampled_from(["acme", "globex"]))
        priority = draw(st.integers(0, 9))
        steps = [allow(run_id, tenant), queued(run_id, tenant, priority), dispatched(run_id, tenant)]
        steps.append(succeeded(run_id, tenant))
        lives.append(steps[: draw(st.integers(1, len(steps)))])
    interleaved: list[Envelope[Any]] = []
    while any(lives):
        life = draw(st.sampled_from([life for life in lives if life]))
        interleaved.append(life.pop(0))
    return interleaved


def folded(events: list[Envelope[Any]]) -> SchedulerState:
    state = SchedulerState()
    for envelope in events:
        evolve(state, envelope)
    return state


def shape(state: SchedulerState) -> tuple[Any, ...]:
    return (
        sorted(state.allowed),
        sorted((key, run.priority, run.order) for key, run in state.queued.items()),
        {tenant: sorted(runs) for tenant, runs in state.running.items() if runs},
        sorted(state.finished),
    )


@given(histories())
def test_the_scheduler_fold_is_idempotent(events: list[Envelope[Any]]) -> None:
    """Applying each event twice (its own publish, then the stream's copy) leaves what applying it once does."""
    twice = SchedulerState()
    for envelope in events:
        evolve(twice, envelope)
        evolve(twice, envelope)
    assert shape(twice) == shape(folded(events))


@given(histories(), st.integers(1, 4))
def test_dispatches_respect_the_tenant_limit_and_urgency(events: list[Envelope[Any]], limit: int) -> None:
    """No tenant goes over its limit; within a tenant the most urgent, then the oldest, go first."""
    state = folded(events)
    chosen = next_dispatches(state, limit)
    for tenant in {run.tenant for run in chosen}:
        picked = [run for run in chosen if run.tenant == tenant]
        assert len(state.running[tenant]) + len(picked) <= limit
        waiting = sorted(
            (run for run in state.queued.values() if run.tenant == tenant), key=lambda run: (run.priority, run.order)
        )
        assert picked == waiting[: len(picked)]
    assert all((run.tenant, run.run_id) not in state.finished for run in chosen)


def test_a_denied_run_is_never_queued_and_a_finished_one_never_again() -> None:
    """Only an allow queues a run; a run that finished stays finished when its old events come round again."""
    state = folded([allow("denied", effect="deny"), allow("done"), queued("done"), dispatched("done")])
    assert ("acme", "denied") not in state.allowed
    evolve(state, succeeded("done"))
    evolve(state, queued("done"))  # a redelivered run.queued after the end
    evolve(state, dispatched("done"))
    assert ("acme", "done") in state.finished
    assert not state.queued
    assert not state.running["acme"]


# --- run-history fold -------------------------------------------------------------------------


def test_a_run_history_holds_each_recorded_step_once_in_order() -> None:
    """Model turns and tool calls land by step number, whatever order or how often they arrive."""
    turn = event(
        StepCompleted(step=0, kind="model_turn", summary="plan", usage=TokenUsage(input_tokens=5, output_tokens=7)),
        "r1",
    )
    call = event(
        ToolCallCompleted(
            tool_call_id="r1-tc1", step=1, tool="math.add", decision_id="d1", outcome="ok", result={"sum": 3}
        ),
        "r1",
    )
    history = RunHistory()
    for envelope in (call, turn, call, event(RunStarted(decision_id="d", worker="w", attempt=2), "r1")):
        history.apply(envelope)
    steps = history.ordered_steps()
    assert [record.step for record in steps] == [0, 1]
    assert steps[0].action == ModelTurn(summary="plan", input_tokens=5, output_tokens=7)
    assert isinstance(steps[1].action, ToolCall)
    assert (steps[1].outcome, steps[1].result) == ("ok", {"sum": 3})
    assert history.attempts == 2
    assert not history.finished
    # A runner taking the run over counts on from what was recorded, tokens included.
    assert history.usage() == RunUsage(steps=2, tool_calls=1, input_tokens=5, output_tokens=7)


def test_a_run_history_keeps_tool_call_decisions_and_sees_the_end() -> None:
    """Decisions on tool calls are kept by tool call id; a run decision is not; run.failed ends the run."""
    history = RunHistory()
    history.apply(allow("r1"))
    history.apply(event(tool_decision("r1-tc1", "deny"), "r1"))
    history.apply(event(RunFailed(reason="agent failed", error_type="AgentError"), "r1"))
    assert list(history.decisions) == ["r1-tc1"]
    assert history.finished


# --- the gate's policy input and decision rules -----------------------------------------------


@given(tenants(), st.integers(0, 9))
def test_a_run_submission_becomes_a_run_start_input(tenant: str, priority: int) -> None:
    """The policy sees who asks, in which tenant, for which agent, with no usage yet."""
    envelope = make_envelope(
        RunSubmitted(agent="researcher", input={"q": 1}, priority=priority),
        tenant=tenant,
        entity_id="r1",
        actor="alice",
        source="test",
    )
    document = policy_input(envelope)
    assert document == {
        "action": "run.start",
        "tenant": tenant,
        "tenant_usage": None,
        "principal": "alice",
        "agent": "researcher",
        "tool": None,
        "model": None,
        "run": {"id": "r1", "usage": RunUsage().model_dump(), "history": {"tool_calls": []}},
    }


def test_a_tool_call_request_carries_its_arguments_and_usage() -> None:
    """A tool call's input names the tool, its arguments as sent, and the run's usage so far."""
    usage = RunUsage(steps=3, tool_calls=2, input_tokens=10, output_tokens=20)
    request = ToolCallRequested(
        tool_call_id="r1-tc3", step=3, agent="researcher", tool="web.fetch", arguments={"url": "u"}, usage=usage
    )
    document = policy_input(make_envelope(request, tenant="acme", entity_id="r1", actor="alice", source="runner"))
    assert document["action"] == "tool.call"
    assert document["tool"] == {"name": "web.fetch", "arguments": {"url": "u"}}
    assert document["run"]["usage"] == usage.model_dump()
    with pytest.raises(TypeError):
        policy_input(succeeded("r1"))


def test_a_model_call_request_names_the_model_its_cap_and_the_usage_so_far() -> None:
    """A model call's input names the model and its output cap, and the run's tokens and cost so far."""
    usage = RunUsage(steps=2, model_calls=1, input_tokens=300, output_tokens=40, cost_usd=0.00021)
    request = ModelCallRequested(
        call_id="mc2-x", step=2, agent="assistant", model="gpt-4o-mini", max_output_tokens=512, usage=usage
    )
    document = policy_input(make_envelope(request, tenant="acme", entity_id="r1", actor="alice", source="runner"))
    assert document["action"] == "model.call"
    assert document["model"] == {"name": "gpt-4o-mini", "max_output_tokens": 512}
    assert document["tool"] is None
    assert document["run"]["usage"] == usage.model_dump()


class ScriptedEngine:
    """Stands in for the Rego engine: knows one agent and one tool, answers as told."""

    revision = "sha256:scripted"
    secret_arguments: dict[str, frozenset[str]] = {}  # noqa: RUF012  (read only)

    def __init__(self, answer: PolicyResult | PolicyEvaluationError) -> None:
        self.answer = answer
        self.evaluated = 0

    def knows_agent(self, agent: str) -> bool:
        return agent == "researcher"

    def knows_tool(self, tool: str) -> bool:
        return tool == "math.add"

    def evaluate(self, _: Any) -> PolicyResult:
        self.evaluated += 1
        if isinstance(self.answer, PolicyEvaluationError):
            raise self.answer
        return self.answer


def decide_with(answer: PolicyResult | PolicyEvaluationError, data: Payload) -> tuple[DecisionMade, int]:
    engine = ScriptedEngine(answer)
    envelope = make_envelope(data, tenant="acme", entity_id="r1", actor="alice", source="test")
    made = PolicyDecider(cast(PolicyEngine, engine), GATE_KEY).decide(envelope, request_seq=7)
    assert TRUSTING_RUNNER.refusal(made, "acme", "r1") is None  # every decision is signed, deny included
    return made, engine.evaluated


GATE_KEY = DecisionSigner(nacl.signing.SigningKey.generate())
TRUSTING_RUNNER = DecisionVerifier([GATE_KEY.public_key])


def signed_tool_decision(**changes: Any) -> DecisionMade:
    envelope = make_envelope(
        ToolCallRequested(tool_call_id="t1", step=1, agent="researcher", tool="math.add", arguments={"a": 1, "b": 2}),
        tenant="acme",
        entity_id="r1",
        actor="alice",
        source="test",
    )
    return PolicyDecider(cast(PolicyEngine, ScriptedEngine(ALLOWED)), GATE_KEY).decide(envelope, request_seq=7)


def test_a_signed_decision_binds_its_request() -> None:
    made = signed_tool_decision()
    assert made.arguments_hash == arguments_hash({"b": 2, "a": 1})  # key order does not matter
    assert made.arguments_hash != arguments_hash({"a": 1, "b": 3})
    assert TRUSTING_RUNNER.refusal(made, "acme", "r1") is None


@pytest.mark.parametrize(
    "change",
    [
        {"effect": "deny"},
        {"tool_call_id": "t2"},
        {"request_seq": 8},
        {"request_id": "another"},
        {"arguments_hash": arguments_hash({"a": 1, "b": 3})},
        {"policy_revision": "sha256:other"},
        {"decision_id": "borrowed"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_an_altered_decision_fails_its_signature(change: dict[str, Any]) -> None:
    altered = signed_tool_decision().model_copy(update=change)
    assert TRUSTING_RUNNER.refusal(altered, "acme", "r1") == "bad signature (forged or altered)"


def test_a_decision_moved_to_another_run_or_tenant_fails_its_signature() -> None:
    made = signed_tool_decision()
    assert TRUSTING_RUNNER.refusal(made, "acme", "r2") == "bad signature (forged or altered)"
    assert TRUSTING_RUNNER.refusal(made, "globex", "r1") == "bad signature (forged or altered)"


def test_unsigned_or_foreign_decisions_are_refused() -> None:
    made = signed_tool_decision()
    assert TRUSTING_RUNNER.refusal(made.model_copy(update={"signature": None}), "acme", "r1") == "unsigned"
    forger = DecisionSigner(nacl.signing.SigningKey.generate())
    forged = made.model_copy(
        update={
            "signing_key": forger.public_key,
            "signature": forger.sign(DecisionBinding.of(made, "acme", "r1")),
        }
    )
    assert TRUSTING_RUNNER.refusal(forged, "acme", "r1") == "signed with a key this runner does not trust"
    # Rotation: a runner that trusts both keys accepts either.
    assert DecisionVerifier([GATE_KEY.public_key, forger.public_key]).refusal(forged, "acme", "r1") is None


ALLOWED = PolicyResult(effect="allow", reasons=("ok",), evaluation_ms=0.2)


@pytest.mark.parametrize(
    ("answer", "data", "effect", "reason", "evaluated"),
    [
        (ALLOWED, RunSubmitted(agent="researcher"), "allow", "ok", 1),
        (ALLOWED, RunSubmitted(agent="stranger"), "deny", "unknown agent 'stranger'", 0),
        (
            ALLOWED,
            ToolCallRequested(tool_call_id="t", step=1, agent="researcher", tool="rm.rf", arguments={}),
            "deny",
            "unknown tool 'rm.rf'",
            0,
        ),
        (PolicyEvaluationError("boom"), RunSubmitted(agent="researcher"), "deny", "fail closed", 1),
        (
            PolicyResult(effect="allow", reasons=(), evaluation_ms=POLICY_BUDGET_MS + 1),
            RunSubmitted(agent="researcher"),
            "deny",
            "over the 1000 ms budget",
            1,
        ),
    ],
    ids=["allowed", "unknown-agent", "unknown-tool", "engine-error", "over-budget"],
)
def test_the_gate_decides_and_fails_closed(
    answer: PolicyResult | PolicyEvaluationError, data: Payload, effect: str, reason: str, evaluated: int
) -> None:
    """The policy's answer stands; an unknown agent or tool is denied unasked; an error or a slow answer is a deny."""
    made, times_evaluated = decide_with(answer, data)
    assert made.effect == effect
    assert any(reason in text for text in made.reasons), made.reasons
    assert times_evaluated == evaluated
    assert (made.request_seq, made.policy_revision) == (7, "sha256:scripted")


# --- projection -------------------------------------------------------------------------------


def stored(messages: list[tuple[str, Envelope[Any]]]) -> list[StoredMessage]:
    """Envelopes as JetStream would hand them to the projector, numbered per stream."""
    seqs: dict[str, int] = {}
    out = []
    for stream, envelope in messages:
        seqs[stream] = seqs.get(stream, 0) + 1
        subject = SUBJECTS.expected_subject(envelope)
        out.append(StoredMessage(stream, seqs[stream], subject, message_headers(envelope), envelope.to_bytes(), NOW))
    return out


def governed_run(run_id: str) -> list[StoredMessage]:
    submitted = make_envelope(RunSubmitted(agent="demo"), tenant="acme", entity_id=run_id, actor="alice", source="cli")
    request = ToolCallRequested(tool_call_id=f"{run_id}-tc1", step=1, agent="demo", tool="math.add", arguments={})
    completed = ToolCallCompleted(
        tool_call_id=f"{run_id}-tc1", step=1, tool="math.add", decision_id="d2", outcome="ok", result=3
    )
    return stored(
        [
            (STREAMS.commands, submitted),
            (STREAMS.events, allow(run_id)),
            (STREAMS.events, queued(run_id)),
            (STREAMS.events, dispatched(run_id)),
            (STREAMS.events, event(RunStarted(decision_id=f"d-{run_id}", worker="w"), run_id)),
            (STREAMS.events, event(StepCompleted(step=0, kind="model_turn"), run_id)),
            (STREAMS.commands, event(request, run_id)),
            (STREAMS.events, event(tool_decision(f"{run_id}-tc1"), run_id)),
            (STREAMS.events, event(completed, run_id)),
            (STREAMS.events, event(RunSucceeded(steps=2, tool_calls=1), run_id)),
        ]
    )


RULES = CommandRules(SUBJECTS, 64 * 1024)


def test_a_governed_run_projects_to_one_row_per_table_key() -> None:
    """A whole run: an events row per message; one runs row, succeeded, with its counts; decisions; the tool call."""
    messages = governed_run("r1")
    rows = project(messages, RULES)
    assert len(rows.events) == len(messages)
    (run,) = rows.run_rows()
    assert (run.status, run.steps, run.tool_calls, run.agent) == ("succeeded", 1, 1, "demo")
    assert len(rows.decisions) == 2
    (tool_call,) = rows.tool_call_rows()
    assert (tool_call.tool, tool_call.decision_id, tool_call.arguments, tool_call.outcome) == (
        "math.add",
        "d2",
        "{}",
        "ok",
    )


@given(st.lists(st.integers(0, 10), min_size=1, max_size=6))
def test_projecting_in_batches_leaves_what_projecting_at_once_does(cuts: list[int]) -> None:
    """Rows merged per batch and absorbed in order equal the rows of one batch: any cut gives the same tables."""
    messages = governed_run("r1") + governed_run("r2")
    points = sorted({min(cut * 2, len(messages)) for cut in cuts} | {0, len(messages)})
    merged = Rows()
    for start, end in itertools.pairwise(points):
        merged.absorb(project(messages[start:end], RULES))
    whole = project(messages, RULES)
    assert merged.run_rows() == whole.run_rows()
    assert merged.tool_call_rows() == whole.tool_call_rows()
    assert merged.decisions == whole.decisions
    assert [row[:2] for row in merged.events] == [row[:2] for row in whole.events]


def test_a_status_never_goes_back() -> None:
    """A late run.started after run.succeeded leaves the run succeeded: statuses only move up their rank."""
    messages = governed_run("r1")
    late = stored([(STREAMS.events, event(RunStarted(decision_id="d-r1", worker="w2", attempt=2), "r1"))])
    rows = project(messages, RULES)
    rows.absorb(project([late[0]._replace(seq=len(messages) + 1)], RULES))
    (run,) = rows.run_rows()
    assert run.status == "succeeded"


def test_a_service_is_handed_only_its_own_secrets(tmp_path: Path) -> None:
    """private_credentials copies a role's seed and needed keys, nothing else, and drops stale files."""
    store = CredentialStore(tmp_path / "all", "p")
    store.ensure_installation()
    target = tmp_path / "gate"
    target.mkdir()
    (target / "operator.nk").write_text("left from before")
    private_credentials(store.directory, Role.POLICY_GATE, target)
    assert sorted(path.name for path in target.iterdir()) == [
        "decision-keys.pub",
        "decision-signing.key",
        "policy-gate.nk",
    ]
    assert (target / "policy-gate.nk").read_bytes() == store.seed_file(Role.POLICY_GATE).read_bytes()
    assert {stat.S_IMODE(path.stat().st_mode) for path in target.iterdir()} == {0o600}
    # A directory made before database roles existed has no password: the projector goes without.
    (store.directory / "postgres-projector.password").unlink()
    projector = private_credentials(store.directory, Role.AUDIT_PROJECTOR, tmp_path / "projector")
    assert sorted(path.name for path in projector.iterdir()) == [
        "audit-projector.nk",
        "checkpoint-keys.pub",
        "checkpoint-signing.key",
    ]
    with pytest.raises(CredentialStoreError):
        private_credentials(tmp_path / "empty", Role.SCHEDULER, tmp_path / "scheduler")


def test_an_installation_gets_an_evidence_key_no_service_is_handed(tmp_path: Path) -> None:
    """The operator's evidence key is made beside the others (and later, for an installation made before
    it existed), kept once made, and in no service's directory."""
    store = CredentialStore(tmp_path / "all", "p")
    store.ensure_installation()
    key, public = store.directory / EVIDENCE_KEY_FILE, store.directory / EVIDENCE_KEYS_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert Signer.from_file(key).public_key in TrustedKeys.read(public)

    # An installation from before: its next start (`warden up`, `credentials init`) adds the key, and
    # changes nothing else.
    others = {path.name: path.read_bytes() for path in store.directory.iterdir() if path.is_file()}
    made = others.pop(EVIDENCE_KEY_FILE), others.pop(EVIDENCE_KEYS_FILE)
    key.unlink()
    public.unlink()
    store.ensure_installation()
    again = {path.name: path.read_bytes() for path in store.directory.iterdir() if path.is_file()}
    assert (again.pop(EVIDENCE_KEY_FILE), again.pop(EVIDENCE_KEYS_FILE)) != made
    assert again == others
    kept = key.read_bytes()
    store.ensure_installation()
    assert key.read_bytes() == kept

    assert not any({EVIDENCE_KEY_FILE, EVIDENCE_KEYS_FILE} & set(names) for names in SERVICE_SECRETS.values())
    handed = {
        path.name
        for directory in hand_out(store.directory, tmp_path / "services").values()
        for path in directory.iterdir()
    }
    assert handed
    assert not {EVIDENCE_KEY_FILE, EVIDENCE_KEYS_FILE} & handed
