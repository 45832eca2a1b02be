"""Shadow mode, promote and rollback: a candidate judged beside live decisions, put in force, taken back."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from faststream import FastStream
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually, run_warden_cli, warden_cli
from tests.test_decision_inputs import request, stored
from tests.test_policies import POLICIES
from tests.test_policy_replay import edited_pack
from tests.test_signed_decisions import publish
from warden.agent_runner.app import build_app as build_runner
from warden.client import WardenClient
from warden.messages import (
    POLICY_LIFECYCLE,
    DecisionMade,
    DecisionShadowed,
    Envelope,
    PolicyActivated,
    PolicyChange,
    PolicyChanged,
    PolicyChangeRequested,
    ToolCallRequested,
    make_envelope,
)
from warden.messages import parse_envelope as parse
from warden.policy_bundle import PolicyBundle
from warden.policy_gate.app import build_app as build_gate
from warden.policy_gate.decide import decision
from warden.policy_lifecycle import Lifecycle
from warden.scheduler.app import build_app as build_scheduler
from warden.settings import Settings
from warden.signing import DecisionSigner
from warden.streams import StreamNames
from warden.subjects import SYSTEM_TENANT, Subjects

ACTIVE = PolicyBundle.read(POLICIES).revision


def narrower(tmp_path: Path) -> Path:
    """A candidate under which a fetch from example.com, allowed today, is denied."""
    return edited_pack(tmp_path, lambda data: data["tools"]["web.fetch"]["allowed_domains"].remove("example.com"))


def fetch(run_id: str, url: str = "https://example.com/a") -> Envelope[Any]:
    call = ToolCallRequested(
        tool_call_id=f"t-{run_id}", step=1, agent="researcher", tool="web.fetch", arguments={"url": url}
    )
    return request(call, run_id)


async def decided(nc: NatsClient, settings: Settings, run_ids: list[str]) -> dict[str, DecisionMade]:
    """The decision on each run's fetch, by run, once every one is stored (exactly one each)."""
    subjects = Subjects(settings.subject_prefix)
    found: dict[str, list[DecisionMade]] = {}
    for run_id in run_ids:
        for message in await stored(nc, settings, subjects.decision_on("acme", ToolCallRequested, run_id), 1):
            found.setdefault(run_id, []).append(parse(message.data).data)
    return {run_id: made[0] for run_id, made in found.items()}


async def policy_change(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    result = await run_warden_cli(settings, "policy", *args)
    assert result.stdout, result.stderr[-2000:]
    return result.status, json.loads(result.stdout)


async def status(settings: Settings) -> dict[str, Any]:
    return dict(json.loads(await warden_cli(settings, "policy", "status", "--json")))


async def stop(app: FastStream) -> None:
    app.exit()

    async def stopped() -> bool:
        return not getattr(app, "running", False)

    await eventually(stopped)


async def test_a_shadow_records_disagreements_and_changes_no_live_decision(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """With a candidate loaded as the shadow, each live decision it would make otherwise is recorded as
    decision.shadowed (both revisions, effects and reasons), and the live decisions stay the active bundle's;
    withdrawn, it judges nothing more."""
    await run_app(build_gate(settings))
    candidate = narrower(tmp_path)
    code, shadowed = await policy_change(settings, "shadow", str(candidate), "--reason", "narrow web.fetch")
    assert code == 0, shadowed
    assert shadowed["decision"] == "allow"
    assert shadowed["reasons"] == ["principal operator in tenant _warden may shadow policy as policy_admin"]
    revision = PolicyBundle.read(candidate).revision
    assert (await status(settings))["shadow"] == revision

    await publish(nc, settings, fetch("r-example"))
    await publish(nc, settings, fetch("r-docs", "https://docs.python.org/3/"))
    live = await decided(nc, settings, ["r-example", "r-docs"])
    assert {run: (made.effect, made.policy_revision) for run, made in live.items()} == {
        "r-example": ("allow", ACTIVE),
        "r-docs": ("allow", ACTIVE),
    }
    subjects = Subjects(settings.subject_prefix)
    [message] = await stored(nc, settings, f"{subjects.prefix}.evt.acme.policy.*.{DecisionShadowed.TYPE}", 1)
    disagreement = parse(message.data).data
    assert isinstance(disagreement, DecisionShadowed)
    assert disagreement.decision_id == live["r-example"].decision_id
    assert (disagreement.active_revision, disagreement.active_effect) == (ACTIVE, "allow")
    assert (disagreement.candidate_revision, disagreement.candidate_effect) == (revision, "deny")
    assert disagreement.candidate_reasons == [
        "host example.com is not in web.fetch's allowed domains [docs.python.org]"
    ]
    assert disagreement.active_reasons == list(live["r-example"].reasons)
    # The fetch both bundles allow alike records no disagreement.
    await asyncio.sleep(0.5)
    assert await stored_now(nc, settings, f"{subjects.prefix}.evt.acme.policy.>") == 1

    # Withdrawn, the shadow judges nothing more, and nothing was ever enforced.
    code, withdrawn = await policy_change(settings, "withdraw", "--revision", revision)
    assert code == 0, withdrawn
    assert (await status(settings))["shadow"] is None
    await publish(nc, settings, fetch("r-after-withdrawal"))
    after = (await decided(nc, settings, ["r-after-withdrawal"]))["r-after-withdrawal"]
    assert (after.effect, after.policy_revision) == ("allow", ACTIVE)
    await asyncio.sleep(0.5)
    assert await stored_now(nc, settings, f"{subjects.prefix}.evt.acme.policy.>") == 1
    code, nothing = await policy_change(settings, "withdraw")
    assert (code, nothing["reasons"]) == (
        1,
        ["there is no shadow bundle to withdraw: load one first (warden policy shadow DIR)"],
    )


async def test_promote_switches_every_gate_without_a_gap_and_rollback_returns(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """Promote puts the shadow in force in both running gates, a burst of commands sent meanwhile is decided
    once each, a gate started afterwards comes back on the promoted bundle, and rollback returns to the first."""
    first, second = build_gate(settings), build_gate(settings)
    await run_app(first)
    await run_app(second)
    candidate = narrower(tmp_path)
    revision = PolicyBundle.read(candidate).revision
    assert (await policy_change(settings, "shadow", str(candidate)))[0] == 0

    burst = [f"r-burst-{index}" for index in range(40)]

    async def send_burst() -> None:
        for run_id in burst:
            await publish(nc, settings, fetch(run_id))
            await asyncio.sleep(0.01)

    sending = asyncio.create_task(send_burst())
    code, promoted = await policy_change(settings, "promote", "--revision", revision, "--reason", "rollout 1")
    await sending
    assert code == 0, promoted
    during = await decided(nc, settings, burst)
    subjects = Subjects(settings.subject_prefix)
    every = await stored(nc, settings, f"{subjects.prefix}.evt.acme.run.*.{DecisionMade.TYPE}", len(burst))
    assert sorted(parse(message.data).entity_id for message in every) == sorted(burst)  # one decision each
    assert {made.policy_revision for made in during.values()} <= {ACTIVE, revision}
    for made in during.values():  # each decision is its revision's, whichever it was made under
        assert made.effect == ("allow" if made.policy_revision == ACTIVE else "deny")

    after = [f"r-after-{index}" for index in range(20)]
    for run_id in after:
        await publish(nc, settings, fetch(run_id))
    # Both gates take commands from the queue group: each must have switched for all to be the candidate's.
    assert {(made.effect, made.policy_revision) for made in (await decided(nc, settings, after)).values()} == {
        ("deny", revision)
    }
    current = await status(settings)
    assert (current["active"], current["shadow"], current["rollback_to"]) == (revision, None, ACTIVE)
    [activated] = await stored(nc, settings, subjects.policy_event(PolicyActivated, revision.replace(":", "-")), 1)
    record = parse(activated.data).data
    assert isinstance(record, PolicyActivated)
    assert (record.cause, record.activated_by, record.previous_revision) == ("promote", "operator", ACTIVE)

    # Each running gate alone decides on the promoted bundle; so does one started after the promote.
    await stop(first)
    await publish(nc, settings, fetch("r-second"))
    assert (await decided(nc, settings, ["r-second"]))["r-second"].policy_revision == revision
    await run_app(build_gate(settings))
    await stop(second)
    await publish(nc, settings, fetch("r-restarted"))
    assert (await decided(nc, settings, ["r-restarted"]))["r-restarted"].policy_revision == revision

    code, rolled_back = await policy_change(settings, "rollback", "--reason", "too narrow")
    assert code == 0, rolled_back
    await publish(nc, settings, fetch("r-back"))
    back = (await decided(nc, settings, ["r-back"]))["r-back"]
    assert (back.effect, back.policy_revision) == ("allow", ACTIVE)
    current = await status(settings)
    assert (current["active"], current["shadow"], current["rollback_to"]) == (ACTIVE, None, None)
    assert [change["change"] for change in current["changes"]] == ["shadow", "promote", "rollback"]
    # Nothing is left to roll back to: refused, on the record.
    code, again = await policy_change(settings, "rollback")
    assert (code, again["decision"]) == (1, "deny")
    assert again["reasons"][0].startswith("there is no earlier bundle to roll back to")


async def test_only_a_policy_administrator_may_change_policy(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """A principal who is not a policy administrator is refused on the record, with the policy's reason,
    and nothing changes."""
    await run_app(build_gate(settings))
    code, refused = await policy_change(settings, "shadow", str(narrower(tmp_path)), "--actor", "auditor")
    assert (code, refused["decision"]) == (1, "deny")
    assert refused["reasons"] == [
        "principal auditor in tenant _warden has roles [viewer]; none of them may change policy"
    ]
    subjects = Subjects(settings.subject_prefix)
    [message] = await stored(nc, settings, f"{subjects.prefix}.evt.{SYSTEM_TENANT}.policy.*.{DecisionMade.TYPE}", 1)
    recorded = parse(message.data)
    assert (recorded.data.decision_id, recorded.data.effect) == (refused["decision_id"], "deny")
    assert recorded.data.input["principal"] == "auditor"
    current = await status(settings)
    assert (current["active"], current["shadow"], current["changes"]) == (ACTIVE, None, [])


async def test_a_bundle_that_does_not_load_is_refused_and_changes_nothing(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """A candidate with a Rego syntax error is refused, naming its file and line; no shadow is loaded, and a
    promote then finds none to promote."""
    await run_app(build_gate(settings))
    broken = edited_pack(tmp_path, replace=("tools.rego", "allowed if {", "allowed if {{"))
    code, refused = await policy_change(settings, "shadow", str(broken))
    assert (code, refused["decision"]) == (1, "deny")
    [reason] = refused["reasons"]
    assert reason.startswith("the candidate bundle was refused: "), reason
    assert "tools.rego:" in reason, reason
    code, nothing = await policy_change(settings, "promote")
    assert (code, nothing["decision"]) == (1, "deny")
    assert nothing["reasons"] == ["there is no shadow bundle to promote: load one first (warden policy shadow DIR)"]
    current = await status(settings)
    assert (current["shadow"], current["changes"]) == (None, [])
    await publish(nc, settings, fetch("r-unchanged"))
    made = (await decided(nc, settings, ["r-unchanged"]))["r-unchanged"]
    assert (made.effect, made.policy_revision) == ("allow", ACTIVE)
    assert not await stored_now(nc, settings, Subjects(settings.subject_prefix).policy_events_of_type(PolicyChanged))


async def stored_now(nc: NatsClient, settings: Settings, subject: str) -> int:
    """How many events are stored on `subject` now."""
    info = await nc.jetstream().stream_info(
        StreamNames.for_prefix(settings.subject_prefix).events, subjects_filter=subject
    )
    return sum((info.state.subjects or {}).values())


def echoed(made: DecisionMade) -> Any:
    """The text a decision's recorded input says the echo was asked with."""
    document: Any = made.input
    return document["tool"]["arguments"]["text"]


async def test_the_runner_enforces_the_promoted_bundles_data(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """After a promote that marks an argument secret, the running agent runner conceals it (so the gate,
    now on that bundle, allows the call); after the rollback it sends it as it did before."""
    agents = tmp_path / "agents"
    agents.mkdir()
    step = {"tool_call": {"tool": "text.echo", "arguments": {"text": "hello"}}}
    definition = {"name": "demo", "description": "echoes", "on_refusal": "fail", "steps": [step]}
    (agents / "demo.json").write_text(json.dumps(definition))
    with_agents = settings.model_copy(update={"agents_dir": agents})
    await run_app(build_gate(with_agents))
    for build in (build_scheduler, build_runner):
        await run_app(build(with_agents))
    candidate = edited_pack(tmp_path, lambda data: data["tools"]["text.echo"].update(secret_arguments=["text"]))
    assert (await policy_change(settings, "shadow", str(candidate)))[0] == 0
    assert (await policy_change(settings, "promote"))[0] == 0

    async def echo_decision(run_id: str) -> DecisionMade:
        client = WardenClient(nc, settings.subject_prefix)
        await client.submit_run(tenant="acme", agent="demo", actor="alice", run_id=run_id)
        subject = Subjects(settings.subject_prefix).decision_on("acme", ToolCallRequested, run_id)
        made: list[DecisionMade] = [
            parse(message.data).data for message in await stored(nc, settings, subject, 2, within=30)
        ]
        return next(decision for decision in made if decision.request_type == ToolCallRequested.TYPE)

    concealed = await echo_decision("r-promoted")
    assert concealed.effect == "allow", concealed.reasons
    assert str(echoed(concealed)).startswith("hmac-sha256:")
    assert concealed.policy_revision == PolicyBundle.read(candidate).revision

    assert (await policy_change(settings, "rollback"))[0] == 0
    clear = await echo_decision("r-rolled-back")
    assert (clear.effect, clear.policy_revision) == ("allow", ACTIVE)
    assert echoed(clear) == "hello"


def changed(change: PolicyChange, revision: str, previous: str, seq: int) -> PolicyChanged:
    return PolicyChanged(
        change=change,
        revision=revision,
        previous_revision=previous,
        files={} if change == "shadow" else None,
        changed_by="operator",
        decision_id=f"d{seq}",
        request_seq=seq,
    )


def test_the_lifecycle_folds_shadows_promotes_and_rollbacks() -> None:
    """Promotes stack the bundles they replace and rollbacks return to them in turn; a change that names
    another bundle than the one held is not followed, and leaves the state as it was."""
    fold: Lifecycle[str] = Lifecycle("A", str)
    assert fold.apply(changed("shadow", "B", "A", 1), 1, lambda: "B") is None
    assert (fold.active, fold.shadow) == ("A", "B")
    assert fold.apply(changed("promote", "C", "A", 2), 2, lambda: None) is not None  # not the shadow held
    assert (fold.active, fold.shadow, fold.earlier) == ("A", "B", [])
    assert fold.apply(changed("promote", "B", "A", 3), 3, lambda: None) is None
    assert (fold.active, fold.shadow, fold.earlier, fold.origin) == ("B", None, ["A"], "events:3")
    fold.apply(changed("shadow", "C", "B", 4), 4, lambda: "C")
    fold.apply(changed("promote", "C", "B", 5), 5, lambda: None)
    assert (fold.active, fold.earlier) == ("C", ["A", "B"])
    assert fold.apply(changed("rollback", "A", "C", 6), 6, lambda: None) is not None  # B comes back first
    fold.apply(changed("rollback", "B", "C", 7), 7, lambda: None)
    fold.apply(changed("rollback", "A", "B", 8), 8, lambda: None)
    assert (fold.active, fold.shadow, fold.earlier) == ("A", None, [])
    assert fold.apply(changed("shadow", "D", "A", 9), 9, lambda: None) is not None  # it did not load here
    assert fold.shadow is None
    fold.apply(changed("shadow", "E", "A", 10), 10, lambda: "E")
    assert fold.apply(changed("withdraw", "F", "A", 11), 11, lambda: None) is not None  # not the shadow held
    assert fold.apply(changed("withdraw", "E", "A", 12), 12, lambda: None) is None
    assert (fold.active, fold.shadow, fold.earlier) == ("A", None, [])


async def test_a_bundle_too_large_for_a_command_is_not_sent(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle over the command size limit is refused by the client, saying its size and the limit; nothing
    reaches the gate."""
    await run_app(build_gate(settings))
    monkeypatch.setenv("WARDEN_MAX_COMMAND_BYTES", "4096")
    result = await run_warden_cli(settings, "policy", "shadow", str(narrower(tmp_path)))
    assert result.status == 1
    assert "-byte command; commands may be at most 4096 bytes" in result.stderr, result.stderr
    decisions = f"{settings.subject_prefix}.evt.{SYSTEM_TENANT}.policy.*.{DecisionMade.TYPE}"
    assert await stored_now(nc, settings, decisions) == 0


async def test_a_redelivered_policy_change_keeps_the_decision_stored_first(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """A policy change whose decision was stored on an earlier delivery (the gate stopped before recording
    the change) is recorded under that decision, which stands: no second decision is stored."""
    bundle = PolicyBundle.read(narrower(tmp_path))
    change = make_envelope(
        PolicyChangeRequested(change="shadow", files=dict(bundle.files), revision=bundle.revision),
        tenant=SYSTEM_TENANT,
        entity_id=POLICY_LIFECYCLE,
        actor="operator",
        source="test",
    )
    seq = await publish(nc, settings, change)
    signer = DecisionSigner.from_file(settings.signing_key_path())
    first = decision(
        change,
        signer,
        request_seq=seq,
        effect="allow",
        reasons=["stored first"],
        policy_revision=ACTIVE,
        evaluation_ms=1,
    )
    recorded = make_envelope(
        first, tenant=SYSTEM_TENANT, entity_id=POLICY_LIFECYCLE, actor="policy-gate", source="policy-gate"
    )
    commands = StreamNames.for_prefix(settings.subject_prefix).commands
    await publish(nc, settings, recorded, key=f"decision-{commands}-{seq}")
    # And a rollback allowed on an earlier delivery that the lifecycle no longer allows: taken as done.
    rollback = make_envelope(
        PolicyChangeRequested(change="rollback"),
        tenant=SYSTEM_TENANT,
        entity_id=POLICY_LIFECYCLE,
        actor="operator",
        source="test",
    )
    rollback_seq = await publish(nc, settings, rollback)
    allowed = decision(
        rollback, signer, request_seq=rollback_seq, effect="allow", reasons=[], policy_revision=ACTIVE, evaluation_ms=1
    )
    await publish(
        nc,
        settings,
        make_envelope(allowed, tenant=SYSTEM_TENANT, entity_id=POLICY_LIFECYCLE, actor="gate", source="gate"),
        key=f"decision-{commands}-{rollback_seq}",
    )

    await run_app(build_gate(settings))
    subjects = Subjects(settings.subject_prefix)
    [message] = await stored(nc, settings, subjects.policy_events_of_type(PolicyChanged), 1)
    recorded_change = parse(message.data).data
    assert isinstance(recorded_change, PolicyChanged)
    assert (recorded_change.decision_id, recorded_change.revision) == (first.decision_id, bundle.revision)
    decisions = subjects.decision_on(SYSTEM_TENANT, PolicyChangeRequested, POLICY_LIFECYCLE)
    assert await stored_now(nc, settings, decisions) == 2

    async def both_acknowledged() -> bool:
        info = await nc.jetstream().consumer_info(commands, "policy_gate")
        return bool(info.ack_floor.stream_seq >= rollback_seq and info.num_ack_pending == 0)

    await eventually(both_acknowledged)
    assert await stored_now(nc, settings, subjects.policy_events_of_type(PolicyChanged)) == 1
    assert (await status(settings))["shadow"] == bundle.revision
