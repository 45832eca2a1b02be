"""Replayable decisions, on the real servers: every decision records the policy input it was made on
(signed by its hash), a secret argument is never in clear there, the decisions table keeps the input,
and each gate's start records the bundle it decides under (`policy.activated`)."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
from nacl.signing import SigningKey
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import JsonValue

from tests.conftest import REPO_ROOT, AppRunner, eventually
from tests.test_signed_decisions import publish
from warden.audit_projector.app import build_app as build_projector
from warden.messages import (
    ApprovalAnswered,
    ApprovalRequested,
    DecisionMade,
    Envelope,
    HaltRequested,
    ModelCallRequested,
    Payload,
    PolicyActivated,
    RunCancelRequested,
    RunSubmitted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.policy_bundle import PolicyBundle, revision_of
from warden.policy_gate.app import build_app as build_gate
from warden.policy_gate.decide import (
    ARGUMENTS_TOO_DEEP,
    CLEAR_SECRET_PREFIX,
    MAX_RECORDED_ARGUMENT_DEPTH,
    PolicyDecider,
    judge_input,
)
from warden.policy_gate.engine import PolicyEngine
from warden.secret_arguments import SecretArguments
from warden.settings import Settings
from warden.signing import DecisionSigner, DecisionVerifier, input_hash
from warden.subjects import SYSTEM_TENANT, Subjects

SECRET = "Bearer s3cr3t-token-never-recorded"


async def stored(nc: NatsClient, settings: Settings, subject: str, count: int, within: float = 15.0) -> list[Msg]:
    """The first `count` messages of the events stream on `subject`, waiting up to `within` seconds."""
    found: list[Msg] = []
    done = asyncio.Event()

    async def collect(message: Msg) -> None:
        found.append(message)
        if len(found) >= count:
            done.set()

    subscription = await nc.jetstream().subscribe(subject, cb=collect, ordered_consumer=True)
    try:
        await asyncio.wait_for(done.wait(), within)
    finally:
        await subscription.unsubscribe()
    return found


def request(data: Payload, run_id: str, actor: str = "alice", tenant: str = "acme") -> Envelope[Any]:
    return make_envelope(data, tenant=tenant, entity_id=run_id, actor=actor, source="test")


def approval_of(asked: DecisionMade) -> Envelope[Any]:
    """The approval request the runner would publish on the gate's require_approval on the refund."""
    assert asked.effect == "require_approval"
    assert asked.expires_at is not None
    return request(
        ApprovalRequested(
            approval_id=asked.decision_id,
            tool_call_id="t-refund",
            step=1,
            agent="refunds",
            tool="payments.refund",
            arguments={"order": "A-1", "amount": 5},
            arguments_hash=asked.arguments_hash or "",
            policy_revision=asked.policy_revision,
            requested_by="carol",
            expires_at=asked.expires_at,
            decision=asked,
        ),
        "r-refund",
        actor="agent-runner",
    )


async def test_every_decision_records_the_input_it_was_made_on(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Run starts, tool and model calls, controls and answers: each decision carries its input, signed
    by its hash; evaluating that input again gives the decision; a secret is in no input in clear."""
    await run_app(build_gate(settings))
    await run_app(build_projector(settings))
    concealer = SecretArguments.from_policy_dir(REPO_ROOT / "policies", b"runner key")
    requests = [
        request(RunSubmitted(agent="researcher"), "r-start"),
        request(RunSubmitted(agent="no-such-agent"), "r-unknown"),
        request(
            ToolCallRequested(
                tool_call_id="t-conc",
                step=1,
                agent="researcher",
                tool="web.fetch",
                arguments=concealer.conceal("web.fetch", {"url": "https://example.com/", "authorization": SECRET}),
            ),
            "r-start",
        ),
        # A runner that forgot to conceal: the command is on the record, the decision's input is not.
        request(
            ToolCallRequested(
                tool_call_id="t-clear",
                step=2,
                agent="researcher",
                tool="web.fetch",
                arguments={"url": "https://example.com/", "authorization": SECRET},
            ),
            "r-start",
        ),
        request(ToolCallRequested(tool_call_id="t-unknown", step=3, agent="researcher", tool="no.such"), "r-start"),
        request(ModelCallRequested(call_id="m-1", step=4, agent="assistant", model="gpt-4o-mini"), "r-start"),
        request(RunCancelRequested(reason="wrong input"), "r-start"),
        request(HaltRequested(agent=None, reason="incident"), "_tenant"),
        request(
            ToolCallRequested(
                tool_call_id="t-refund",
                step=1,
                agent="refunds",
                tool="payments.refund",
                arguments={"order": "A-1", "amount": 5},
            ),
            "r-refund",
            actor="carol",
        ),
    ]
    for envelope in requests:
        await publish(nc, settings, envelope)
    decisions = f"{settings.subject_prefix}.evt.*.*.*.{DecisionMade.TYPE}"
    made = [parse_envelope(m.data) for m in await stored(nc, settings, decisions, len(requests))]
    by_request = {envelope.data.request_id: envelope for envelope in made}
    approval = approval_of(by_request[requests[-1].id].data)
    approval_seq = await publish(nc, settings, approval)
    answers = [
        request(
            ApprovalAnswered(
                approval_id=by_request[requests[-1].id].data.decision_id, approval_seq=approval_seq, approve=True
            ),
            "r-refund",
            actor="dana",
        ),
        # Names no approval request: nothing was evaluated, so there is no input.
        request(
            ApprovalAnswered(approval_id="nothing", approval_seq=approval_seq + 1000, approve=True),
            "r-refund",
            actor="dana",
        ),
    ]
    for envelope in answers:
        await publish(nc, settings, envelope)
    made = [parse_envelope(m.data) for m in await stored(nc, settings, decisions, len(requests) + len(answers))]
    by_request = {envelope.data.request_id: envelope for envelope in made}

    engine = PolicyEngine.load(REPO_ROOT / "policies")
    verifier = DecisionVerifier.from_file(settings.trusted_keys_path())
    for envelope in made:
        verdict = envelope.data
        assert isinstance(verdict, DecisionMade)
        assert verifier.refusal(verdict, envelope.tenant, envelope.entity_id) is None
        assert verdict.policy_revision == engine.revision
        assert SECRET not in json.dumps(verdict.input)
        if verdict.input is None:
            assert verdict.request_id == answers[1].id
            continue
        assert verdict.input_hash == input_hash(verdict.input)
        # The signature covers the hash: an input swapped after the fact no longer matches it.
        assert (
            verifier.refusal(
                verdict.model_copy(update={"input_hash": "sha256:" + "0" * 64}), envelope.tenant, envelope.entity_id
            )
            is not None
        )

    def replayed(envelope: Envelope[Any]) -> tuple[str, list[str]]:
        verdict = by_request[envelope.id].data
        result = engine.evaluate(verdict.input)
        return result.effect, list(result.reasons)

    def recorded(envelope: Envelope[Any], drop_first_reason: bool = False) -> tuple[str, list[str]]:
        verdict = by_request[envelope.id].data
        return verdict.effect, verdict.reasons[1:] if drop_first_reason else verdict.reasons

    start, unknown_agent, concealed, clear, unknown_tool, model, cancel, halt, refund = requests
    for evaluated in (start, concealed, clear, model, refund):
        assert replayed(evaluated) == recorded(evaluated)
    assert recorded(clear) == ("deny", ["argument authorization of tool web.fetch is secret and arrived in clear"])
    clear_input = by_request[clear.id].data.input
    assert clear_input["tool"]["arguments"]["authorization"].startswith(CLEAR_SECRET_PREFIX)
    # Decided before any policy ran; the input is what would have been evaluated.
    assert by_request[unknown_agent.id].data.input["agent"] == "no-such-agent"
    assert by_request[unknown_tool.id].data.input["tool"]["name"] == "no.such"
    # An allowed control's, and an answer's, first reason says what it does; the policy's follow.
    for evaluated in (cancel, halt, answers[0]):
        assert replayed(evaluated) == ("allow", recorded(evaluated, drop_first_reason=True)[1])
        assert by_request[evaluated.id].data.effect == "allow"
    assert by_request[answers[0].id].data.input["action"] == "approval.answer"

    assert_replay_agrees(engine, made)

    async def projected() -> list[asyncpg.Record]:
        try:
            return await db.fetch("SELECT decision_id, input FROM decisions")
        except asyncpg.UndefinedTableError:
            return []

    rows = await eventually(lambda: _at_least(projected, len(made)))
    inputs = {row["decision_id"]: json.loads(row["input"]) if row["input"] else None for row in rows}
    assert inputs == {envelope.data.decision_id: envelope.data.input for envelope in made}


def assert_replay_agrees(engine: PolicyEngine, made: list[Envelope[Any]]) -> None:
    """`warden policy replay` re-decides each recorded input with the gate's own rules: they must agree."""
    for envelope in made:
        verdict = envelope.data
        if verdict.input is not None:
            assert judge_input(engine, verdict.input) == (verdict.effect, tuple(verdict.reasons)), verdict


async def _at_least(fetch: Callable[[], Any], count: int) -> Any:
    rows = await fetch()
    return rows if len(rows) >= count else None


async def test_each_gate_start_records_the_bundle_it_decides_under(
    settings: Settings, nc: NatsClient, run_app: AppRunner
) -> None:
    """Two gates starting together make one policy.activated event, whose files give the revision."""
    await run_app(build_gate(settings))
    await run_app(build_gate(settings))
    subjects = Subjects(settings.subject_prefix)
    (message,) = await stored(nc, settings, subjects.policy_events_of_type(PolicyActivated), 1)
    event = parse_envelope(message.data)
    activated = event.data
    assert isinstance(activated, PolicyActivated)
    assert event.tenant == SYSTEM_TENANT
    shipped = PolicyBundle.read(REPO_ROOT / "policies")
    assert activated.revision == shipped.revision == PolicyEngine.load(REPO_ROOT / "policies").revision
    assert activated.files == shipped.files
    assert revision_of({name: text.encode() for name, text in activated.files.items()}) == activated.revision
    assert (activated.cause, activated.activated_by) == ("start", "policy-gate")
    await asyncio.sleep(0.5)
    info = await nc.jetstream().stream_info(
        f"{settings.subject_prefix.upper()}_EVENTS", subjects_filter=subjects.policy_events_of_type(PolicyActivated)
    )
    assert info.state.messages == 1  # the second gate's was a duplicate


def test_arguments_too_deep_to_record_are_denied_before_any_policy_runs() -> None:
    """A tool call whose arguments nest too deep to be recorded in its decision is denied, with no input."""
    deep: dict[str, JsonValue] = {"leaf": 1}
    for _ in range(MAX_RECORDED_ARGUMENT_DEPTH - 2):
        deep = {"a": deep}
    decider = PolicyDecider(PolicyEngine.load(REPO_ROOT / "policies"), DecisionSigner(SigningKey.generate()))
    deepest = ToolCallRequested(
        tool_call_id="t-deep", step=1, agent="researcher", tool="web.fetch", arguments={"deep": {"a": deep}}
    )
    made = decider.decide(request(deepest, "r-deep"), request_seq=1)
    assert (made.effect, made.reasons, made.input, made.input_hash) == ("deny", [ARGUMENTS_TOO_DEEP], None, None)
    shallow = deepest.model_copy(update={"arguments": {"deep": deep}})
    assert decider.decide(request(shallow, "r-deep"), request_seq=2).input is not None
