"""`warden policy replay`: recorded decisions re-decided on a candidate bundle, and the flips reported."""

import json
import random
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from bench.policy_replay import _request
from tests.conftest import AppRunner, run_warden_cli
from tests.test_decision_inputs import request, stored
from tests.test_policies import POLICIES, corpus
from tests.test_signed_decisions import publish
from warden.cli import POLICY_REPLAY_FLIPS, parse_since
from warden.decision_history import RecordedDecision, decision_from_event
from warden.messages import DecisionMade, RunSubmitted, ToolCallRequested, make_envelope
from warden.policy_gate.app import build_app as build_gate
from warden.policy_gate.decide import judge_input, policy_input
from warden.policy_gate.engine import PolicyEngine
from warden.policy_gate.policy_replay import IN_PROCESS_BELOW, replay_events
from warden.settings import Settings
from warden.subjects import Subjects


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load(POLICIES)


def recorded(engine: PolicyEngine, documents: Sequence[dict[str, Any] | None]) -> list[tuple[int, bytes]]:
    """Decision events as the gate stores them (stream sequence, bytes): each input judged on the pack in force;
    a None document is a decision recorded before inputs were."""
    events = []
    for index, document in enumerate(documents):
        effect, reasons = judge_input(engine, document) if document is not None else ("allow", ())
        made = DecisionMade(
            decision_id=f"D{index}",
            request_type=ToolCallRequested.TYPE,
            request_id=f"Q{index}",
            request_seq=index + 1,
            effect=effect,
            reasons=list(reasons),
            policy_revision=engine.revision,
            evaluation_ms=0.1,
            input=document,
        )
        tenant = str((document or {}).get("tenant", "acme"))
        event = make_envelope(made, tenant=tenant, entity_id=f"R{index}", actor="policy-gate", source="policy-gate")
        events.append((index + 1, event.to_bytes()))
    return events


def decisions_of(events: list[tuple[int, bytes]]) -> list[RecordedDecision]:
    parsed = [decision_from_event(seq, body) for seq, body in events]
    assert None not in parsed
    return [decision for decision in parsed if decision is not None]


def requests(count: int) -> list[dict[str, Any]]:
    """Inputs as the gate builds them from requests (bench.policy_replay's mix), each run its own."""
    rng = random.Random(7)
    return [policy_input(_request(index, rng)) for index in range(count)]


def edited_pack(tmp_path: Path, edit_data: Any = None, replace: tuple[str, str, str] | None = None) -> Path:
    pack = Path(shutil.copytree(POLICIES, tmp_path / "candidate"))
    if edit_data is not None:
        data = json.loads((pack / "data.json").read_text())
        edit_data(data["warden"])
        (pack / "data.json").write_text(json.dumps(data))
    if replace is not None:
        name, old, new = replace
        source = (pack / name).read_text()
        assert old in source
        (pack / name).write_text(source.replace(old, new))
    return pack


def test_the_pack_replays_its_own_decisions_unchanged(engine: PolicyEngine) -> None:
    """Replaying every recorded decision on the bundle that made them changes none of them."""
    events = recorded(engine, [*corpus(), *requests(300)])
    report = replay_events(events, POLICIES, workers=1)
    assert report.replayed == len(events)
    assert report.unchanged == len(events), [flip.as_json() for flip in report.flips[:3]]
    assert report.flips == []
    assert {decision.effect for decision in decisions_of(events)} >= {"allow", "deny", "require_approval"}


def test_a_narrower_candidate_flips_exactly_the_decisions_it_should(engine: PolicyEngine, tmp_path: Path) -> None:
    """Taking a domain out of web.fetch's allowed list flips the allowed fetches there, and only those."""
    events = recorded(engine, [*corpus(), *requests(600)])
    candidate = edited_pack(tmp_path, lambda data: data["tools"]["web.fetch"]["allowed_domains"].remove("example.com"))
    report = replay_events(events, candidate, workers=1)
    expected = {
        decision.decision_id
        for decision in decisions_of(events)
        if decision.effect in ("allow", "require_approval")
        and (decision.input or {}).get("action") == "tool.call"
        and "example.com" in str(((decision.input or {}).get("tool") or {}).get("arguments", {}).get("url", ""))
    }
    assert expected, "the history holds allowed fetches of example.com"
    assert {flip.recorded.decision_id for flip in report.effect_flips} == expected
    assert {flip.effect for flip in report.effect_flips} == {"deny"}
    assert set(report.transitions()) <= {"allow -> deny", "require_approval -> deny"}
    assert report.candidate_revision != engine.revision


def test_a_changed_reason_is_reported_but_flips_no_effect(engine: PolicyEngine, tmp_path: Path) -> None:
    """A candidate that only words a reason otherwise changes reasons, not effects: exit status 0 material."""
    events = recorded(engine, list(corpus()))
    candidate = edited_pack(tmp_path, replace=("tools.rego", "is allowed for agent", "may be called by agent"))
    report = replay_events(events, candidate, workers=1)
    assert report.effect_flips == []
    assert report.reason_changes
    assert all(any("may be called by agent" in reason for reason in flip.reasons) for flip in report.reason_changes)


def test_decisions_recorded_without_their_input_are_counted_not_judged(engine: PolicyEngine) -> None:
    """A decision made before inputs were recorded cannot be re-decided: it is counted apart."""
    documents: list[dict[str, Any] | None] = list(corpus()[:20])
    documents[:5] = [None] * 5
    report = replay_events(recorded(engine, documents), POLICIES, workers=1)
    assert (report.without_input, report.replayed, report.unchanged) == (5, 15, 15)


def test_a_stored_message_that_is_not_a_decision_is_counted_not_judged(engine: PolicyEngine) -> None:
    """Bytes on a decision subject that are not a decision event are counted as unreadable, in-process and
    in the workers alike."""
    events = recorded(engine, requests(IN_PROCESS_BELOW + 10))
    events[3] = (events[3][0], b"not json")
    events[-3] = (events[-3][0], json.dumps({"type": "run.queued"}).encode())
    for workers in (1, 2):
        report = replay_events(events, POLICIES, workers=workers)
        assert (report.unreadable, report.replayed, report.unchanged) == (2, len(events) - 2, len(events) - 2)


def test_worker_processes_decide_as_one_process_does(engine: PolicyEngine, tmp_path: Path) -> None:
    """The same history gives the same report whether judged in this process or in two workers."""
    events = recorded(engine, requests(IN_PROCESS_BELOW + 2500))
    candidate = edited_pack(tmp_path, lambda data: data["tools"]["web.fetch"]["allowed_domains"].remove("example.com"))
    alone = replay_events(events, candidate, workers=1)
    pooled = replay_events(events, candidate, workers=2)
    assert [flip.as_json() for flip in pooled.flips] == [flip.as_json() for flip in alone.flips]
    assert (pooled.replayed, pooled.unchanged) == (alone.replayed, alone.unchanged)
    assert alone.effect_flips


def test_only_well_formed_decision_events_are_read() -> None:
    """A message on a decision subject that is not a decision event is not read as one."""
    assert decision_from_event(1, b"not json") is None
    assert decision_from_event(1, json.dumps({"type": "decision.made", "data": {}}).encode()) is None
    assert decision_from_event(1, json.dumps({"type": "run.queued", "tenant": "acme"}).encode()) is None


def test_since_takes_a_time_or_an_age() -> None:
    """--since reads ISO times (UTC when no zone is given) and ages in s, m, h or d."""
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-12-01T08:00:00", now) == datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    assert parse_since("2026-12-01T08:00:00+01:00", now) == datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    with pytest.raises(Exception, match="ISO 8601"):
        parse_since("yesterday", now)


async def test_the_cli_replays_a_gates_history_and_exits_non_zero_when_an_effect_flips(
    settings: Settings, nc: NatsClient, run_app: AppRunner, tmp_path: Path
) -> None:
    """On a running gate's recorded decisions: the bundle in force replays them unchanged (exit 0); a
    candidate that narrows a domain flips exactly those fetches (exit 7), in the table and the JSON;
    --tenant and --since choose which decisions are replayed."""
    await run_app(build_gate(settings))
    urls = ["https://example.com/a", "https://docs.python.org/3/", "https://www.example.com/b", "https://evil.net/"]
    requests = [
        request(
            ToolCallRequested(
                tool_call_id=f"t{index}", step=index, agent="researcher", tool="web.fetch", arguments={"url": url}
            ),
            f"r{index}",
        )
        for index, url in enumerate(urls)
    ]
    requests += [
        request(RunSubmitted(agent="researcher"), "r-start"),
        request(RunSubmitted(agent="researcher"), "g-start", actor="gina", tenant="globex"),
    ]
    for envelope in requests:
        await publish(nc, settings, envelope)
    await stored(nc, settings, Subjects(settings.subject_prefix).decisions(), len(requests))

    def replay(*args: str) -> Any:
        return run_warden_cli(settings, "policy", "replay", "--quiet", *args)

    same = await replay("--candidate", str(POLICIES), "--json")
    assert same.status == 0, same.stderr
    report = json.loads(same.stdout)
    assert (report["replayed"], report["unchanged"], report["effect_flips"]) == (len(requests), len(requests), 0)

    candidate = edited_pack(tmp_path, lambda data: data["tools"]["web.fetch"]["allowed_domains"].remove("example.com"))
    flipped = await replay("--candidate", str(candidate), "--json")
    assert flipped.status == POLICY_REPLAY_FLIPS, flipped.stderr
    report = json.loads(flipped.stdout)
    assert report["transitions"] == {"allow -> deny": 2}
    assert sorted(flip["run_id"] for flip in report["flips"] if flip["change"] == "effect") == ["r0", "r2"]
    table = await replay("--candidate", str(candidate))
    assert table.status == POLICY_REPLAY_FLIPS
    assert "allow -> deny: 2" in table.stdout
    rows = [line.split()[2:6] for line in table.stdout.splitlines() if line.startswith("20")]
    # Effect flips first; then the fetch denied before and now for a reason worded with the new list.
    assert rows == [
        ["r0", "tool_call.requested", "allow", "deny"],
        ["r2", "tool_call.requested", "allow", "deny"],
        ["r3", "tool_call.requested", "deny", "deny"],
    ], table.stdout
    # The columns line up under their headings.
    lines = table.stdout.splitlines()
    header = next(line for line in lines if line.startswith("time"))
    for line in (line for line in lines if line.startswith("20")):
        assert line[header.index("recorded") :].split()[0] in ("allow", "deny"), table.stdout

    globex = json.loads((await replay("--candidate", str(candidate), "--tenant", "globex", "--json")).stdout)
    assert (globex["replayed"], globex["effect_flips"]) == (1, 0)
    later = await replay("--candidate", str(candidate), "--since", "2099-01-01T00:00:00Z", "--json")
    assert (later.status, json.loads(later.stdout)["replayed"]) == (0, 0)
