"""Signed decisions against forgery, on the real servers: a runner acts only on the gate's signature
over the very request it made. Each attack is made by a connection allowed to write every stream
(the test session's superuser), which is more than any Warden identity but the gate may do.

The gate is played by the test here (with the installation's real signing key), so that each
forged message can be put in front of the genuine one, deterministically.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import nacl.signing
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from tests.conftest import AppRunner, eventually
from tests.test_governed_run import run_events, run_row
from warden.agent_runner.app import build_app as build_runner
from warden.audit_projector.app import build_app as build_projector
from warden.bus import envelope_headers
from warden.client import WardenClient
from warden.ids import new_id
from warden.messages import (
    DecisionMade,
    DecisionRefused,
    Effect,
    Envelope,
    RunDispatched,
    RunSubmitted,
    ToolCallCompleted,
    ToolCallRequested,
    make_envelope,
    parse_envelope,
)
from warden.policy_gate.decide import decision
from warden.reader import FilteredReader
from warden.scheduler.app import build_app as build_scheduler
from warden.settings import Settings
from warden.signing import DecisionBinding, DecisionSigner, DecisionVerifier
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.timeline import run_timeline

EVIL_URL = "https://evil.example.net/exfiltrate"


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return settings.model_copy(update={"decision_timeout_seconds": 5.0})


async def publish(nc: NatsClient, settings: Settings, envelope: Envelope[Any], key: str | None = None) -> int:
    subjects, streams = Subjects(settings.subject_prefix), StreamNames.for_prefix(settings.subject_prefix)
    stream = streams.commands if envelope.data.KIND == "command" else streams.events
    ack = await nc.jetstream().publish(
        subjects.expected_subject(envelope), envelope.to_bytes(), headers=envelope_headers(envelope, key), stream=stream
    )
    return ack.seq


class PlayedGate:
    """The test's stand-in for the policy gate: signs with the installation's key what the test decides."""

    def __init__(self, nc: NatsClient, settings: Settings) -> None:
        self.nc = nc
        self.settings = settings
        self.signer = DecisionSigner.from_file(settings.signing_key_path())

    def verdict(
        self, request: Envelope[Any], seq: int, effect: Effect, signer: DecisionSigner | None = None
    ) -> DecisionMade:
        return decision(
            request,
            signer or self.signer,
            request_seq=seq,
            effect=effect,
            reasons=[f"{effect} (played gate)"],
            policy_revision="test",
            evaluation_ms=0.1,
        )

    async def answer(self, request: Envelope[Any], seq: int, verdict: DecisionMade) -> None:
        event = make_envelope(
            verdict, tenant=request.tenant, entity_id=request.entity_id, actor="policy-gate", source="policy-gate"
        )
        await publish(self.nc, self.settings, event)


@pytest.fixture
async def commands(nc: NatsClient, settings: Settings) -> AsyncIterator[asyncio.Queue[tuple[Envelope[Any], int]]]:
    """Every command stored from now on, with its stream sequence: what the played gate sees."""
    seen: asyncio.Queue[tuple[Envelope[Any], int]] = asyncio.Queue()

    async def on_message(message: Msg) -> None:
        seen.put_nowait((parse_envelope(message.data), message.metadata.sequence.stream))

    reader = FilteredReader(
        nc,
        StreamNames.for_prefix(settings.subject_prefix).commands,
        f"{settings.subject_prefix}.cmd.>",
        on_message,
        deliver_policy=DeliverPolicy.NEW,
    )
    await reader.start()
    yield seen
    await reader.stop()


async def next_request(
    commands: asyncio.Queue[tuple[Envelope[Any], int]], accept: Callable[[Envelope[Any]], bool]
) -> tuple[Envelope[Any], int]:
    while True:
        request, seq = await asyncio.wait_for(commands.get(), 30)
        if accept(request):
            return request, seq


def is_tool_call(url: str) -> Callable[[Envelope[Any]], bool]:
    def matches(request: Envelope[Any]) -> bool:
        data = request.data
        return isinstance(data, ToolCallRequested) and data.arguments.get("url") == url

    return matches


async def submitted_and_allowed(
    nc: NatsClient, settings: Settings, gate: PlayedGate, commands: asyncio.Queue[tuple[Envelope[Any], int]]
) -> str:
    """A demo run submitted by alice, allowed by the (played) gate: its run id."""
    receipt = await WardenClient(nc, settings.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
    request, seq = await next_request(commands, lambda request: isinstance(request.data, RunSubmitted))
    await gate.answer(request, seq, gate.verdict(request, seq, "allow"))
    return receipt.run_id


async def tool_outcomes(nc: NatsClient, settings: Settings, run_id: str) -> dict[str, str]:
    events = await run_events(nc, settings, "acme", run_id)
    return {
        event.data.tool_call_id: event.data.outcome for event in events if isinstance(event.data, ToolCallCompleted)
    }


async def refusals(nc: NatsClient, settings: Settings, run_id: str) -> list[DecisionRefused]:
    events = await run_events(nc, settings, "acme", run_id)
    return [event.data for event in events if isinstance(event.data, DecisionRefused)]


async def start_services_but_the_gate(run_app: AppRunner, settings: Settings) -> None:
    for build in (build_projector, build_scheduler, build_runner):
        await run_app(build(settings))


@dataclass(frozen=True)
class AtTheForbiddenFetch:
    """A demo run allowed, its first fetch allowed, the runner now waiting on its forbidden fetch."""

    gate: PlayedGate
    run_id: str
    allowed: Envelope[Any]  # the first fetch's request
    request: Envelope[Any]  # the forbidden fetch's request
    seq: int  # where that request is in the commands stream


async def up_to_the_forbidden_fetch(
    settings: Settings, nc: NatsClient, run_app: AppRunner, commands: asyncio.Queue[tuple[Envelope[Any], int]]
) -> AtTheForbiddenFetch:
    await start_services_but_the_gate(run_app, settings)
    gate = PlayedGate(nc, settings)
    run_id = await submitted_and_allowed(nc, settings, gate, commands)
    allowed, seq = await next_request(commands, is_tool_call("https://example.com/answers"))
    await gate.answer(allowed, seq, gate.verdict(allowed, seq, "allow"))
    request, seq = await next_request(commands, is_tool_call(EVIL_URL))
    return AtTheForbiddenFetch(gate, run_id, allowed, request, seq)


async def test_a_forged_allow_is_refused_and_recorded(
    quick: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
    commands: asyncio.Queue[tuple[Envelope[Any], int]],
) -> None:
    """Allows on the forbidden fetch, unsigned and signed by a key of the attacker's own, each naming the
    runner's request exactly, reach the runner before the gate's deny: neither is acted on, both are
    recorded, and the gate's deny is what the runner applies."""
    at = await up_to_the_forbidden_fetch(quick, nc, run_app, commands)
    gate, run_id, request, seq = at.gate, at.run_id, at.request, at.seq
    honest_deny = gate.verdict(request, seq, "deny")
    attacker = DecisionSigner(nacl.signing.SigningKey.generate())
    unsigned = gate.verdict(request, seq, "allow").model_copy(update={"signature": None, "signing_key": None})
    await gate.answer(request, seq, unsigned)
    await gate.answer(request, seq, gate.verdict(request, seq, "allow", signer=attacker))
    # A genuine signature, the effect flipped afterwards.
    await gate.answer(request, seq, honest_deny.model_copy(update={"effect": "allow", "decision_id": new_id()}))
    await gate.answer(request, seq, honest_deny)

    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded"
    outcomes = await tool_outcomes(nc, quick, run_id)
    assert outcomes[request.data.tool_call_id] == "refused"
    assert outcomes[at.allowed.data.tool_call_id] == "ok"
    reasons = sorted(refused.reason for refused in await refusals(nc, quick, run_id))
    assert reasons == [
        "bad signature (forged or altered)",
        "signed with a key this runner does not trust",
        "unsigned",
    ]

    # The audit's timeline checks each decision's signature as the runner did: the three forgeries
    # read as not the gate's, never as "policy gate: ALLOW".
    tenant = run["tenant"]
    decisions_stored = "SELECT count(*) FROM events WHERE entity_id = $1 AND type = 'decision.made'"
    await eventually(lambda: _at_least(db.fetchval(decisions_stored, run_id), 6), within=30)
    timeline = await run_timeline(db, tenant, run_id, DecisionVerifier.from_file(quick.trusted_keys_path()))
    decided = [line for line in timeline if "decision " in line and ("policy gate" in line or "SECURITY" in line)]
    marked = "SECURITY: NOT THE GATE'S ("
    forged = sorted(line.split(marked, 1)[1].split("): ", 1)[0] for line in decided if marked in line)
    assert forged == reasons
    genuine = [line for line in decided if line.split("  ", 1)[1].startswith("policy gate: ")]
    assert len(genuine) == 3, decided  # the run's allow, the allowed fetch's, the forbidden fetch's deny
    assert all(line.endswith(", signed]") for line in genuine), genuine
    unchecked = await run_timeline(db, tenant, run_id)
    assert sum("signature not checked]" in line for line in unchecked) == 6


async def test_a_borrowed_allow_is_refused(
    quick: Settings,
    nc: NatsClient,
    db: asyncpg.Connection,
    run_app: AppRunner,
    commands: asyncio.Queue[tuple[Envelope[Any], int]],
) -> None:
    """A request of the attacker's for the same tool call id, with harmless arguments, gets a genuine
    allow before the runner's own request is decided: the runner refuses it as an answer to another
    request, and applies the deny of its own."""
    at = await up_to_the_forbidden_fetch(quick, nc, run_app, commands)
    gate, run_id, request, seq = at.gate, at.run_id, at.request, at.seq
    harmless = make_envelope(
        request.data.model_copy(update={"arguments": {"url": "https://example.com/harmless"}}),
        tenant="acme",
        entity_id=run_id,
        actor="alice",
        source="attacker",
    )
    borrowed_seq = await publish(nc, quick, harmless)
    await gate.answer(harmless, borrowed_seq, gate.verdict(harmless, borrowed_seq, "allow"))
    await gate.answer(request, seq, gate.verdict(request, seq, "deny"))

    run = await eventually(await run_row(db, run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded"
    assert (await tool_outcomes(nc, quick, run_id))[request.data.tool_call_id] == "refused"
    [refused] = await refusals(nc, quick, run_id)
    assert f"it answers request {borrowed_seq}, not this one ({seq}): borrowed" == refused.reason


ForgedDecision = Callable[[PlayedGate, Envelope[Any], int], Awaitable[DecisionMade | None]]


async def _none(gate: PlayedGate, submission: Envelope[Any], seq: int) -> None:
    return None


async def _self_signed(gate: PlayedGate, submission: Envelope[Any], seq: int) -> DecisionMade:
    return gate.verdict(submission, seq, "allow", signer=DecisionSigner(nacl.signing.SigningKey.generate()))


async def _another_runs_allow(gate: PlayedGate, submission: Envelope[Any], seq: int) -> DecisionMade:
    other = submission.model_copy(update={"entity_id": "some-other-run"})
    return gate.verdict(other, seq, "allow")


async def _genuine_deny_made_allow(gate: PlayedGate, submission: Envelope[Any], seq: int) -> DecisionMade:
    deny = gate.verdict(submission, seq, "deny")
    assert DecisionBinding.of(deny, submission.tenant, submission.entity_id).effect == "deny"
    return deny.model_copy(update={"effect": "allow"})


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (_none, "the work item carries no decision"),
        (_self_signed, "signed with a key this runner does not trust"),
        (_another_runs_allow, "bad signature (forged or altered)"),
        (_genuine_deny_made_allow, "bad signature (forged or altered)"),
    ],
    ids=["no-decision", "self-signed", "another-runs-allow", "deny-made-allow"],
)
async def test_a_forged_dispatch_starts_nothing(
    quick: Settings, nc: NatsClient, run_app: AppRunner, forge: ForgedDecision, reason: str
) -> None:
    """A work item written straight onto the work stream, for a run the gate never allowed: the runner
    starts nothing and records why."""
    await run_app(build_runner(quick))
    gate = PlayedGate(nc, quick)
    submission = make_envelope(
        RunSubmitted(agent="demo"), tenant="acme", entity_id=new_id(), actor="mallory", source="t"
    )
    seq = await publish(nc, quick, submission)
    forged = await forge(gate, submission, seq)
    work = make_envelope(
        RunDispatched(
            decision_id=forged.decision_id if forged else "d-none", agent="demo", request_seq=seq, decision=forged
        ),
        tenant="acme",
        entity_id=submission.entity_id,
        actor="scheduler",
        source="scheduler",
    )
    await nc.jetstream().publish(
        Subjects(quick.subject_prefix).work("acme"), work.to_bytes(), headers=envelope_headers(work)
    )

    async def refused() -> list[DecisionRefused]:
        return await refusals(nc, quick, submission.entity_id)

    [refusal] = await eventually(refused, within=20)
    assert refusal.reason == reason
    types = [event.type for event in await run_events(nc, quick, "acme", submission.entity_id)]
    assert types == ["decision.refused"]  # no run.started, no step, no tool call


async def _at_least(count: Awaitable[int], wanted: int) -> bool:
    return await count >= wanted
