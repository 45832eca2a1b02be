"""Policies that see what a run did before: its earlier tool calls travel with each request, to the gate."""

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually
from tests.test_governed_run import run_events, run_row, start_all
from warden.agent_runner.actions import ModelTurn, StepRecord, ToolCall
from warden.agent_runner.history import call_facts, url_host
from warden.client import WardenClient
from warden.messages import CallFact, DecisionMade, ToolCallCompleted, ToolCallRequested
from warden.settings import Settings


def test_call_facts_are_the_tool_calls_so_far_with_how_they_ended_and_where_they_reached() -> None:
    """Model turns are left out; each tool call keeps its tool, outcome and the host of its url."""
    fetch = ToolCall(tool="web.fetch", arguments={"url": "https://Example.com/a"})
    steps = [
        StepRecord(step=0, action=ModelTurn(summary="plan")),
        StepRecord(step=1, action=fetch, outcome="ok", host=url_host(fetch.arguments)),
        StepRecord(step=2, action=ToolCall(tool="math.add", arguments={"a": 1, "b": 2}), outcome="refused"),
    ]
    assert call_facts(steps) == [
        CallFact(tool="web.fetch", outcome="ok", host="example.com"),
        CallFact(tool="math.add", outcome="refused", host=None),
    ]


@pytest.mark.parametrize(
    ("arguments", "host"),
    [({"url": "https://docs.python.org:443/x"}, "docs.python.org"), ({"url": "not a url"}, None), ({}, None)],
)
def test_url_host_reads_the_url_argument_or_gives_none(arguments: dict[str, object], host: str | None) -> None:
    """Only a `url` argument with a readable host names one."""
    assert url_host(arguments) == host  # type: ignore[arg-type]


async def test_a_post_after_reading_a_web_page_waits_for_a_human_on_the_record(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """The reporter fetches a page, then posts: the post's request carries the fetch, the policy asks for
    approval (the run pauses, saying why), and the post runs once an approver answers."""
    await start_all(run_app, settings)
    client = WardenClient(nc, settings.subject_prefix)
    receipt = await client.submit_run(tenant="acme", agent="reporter", actor="alice", input={"report": "all quiet"})
    [pending] = await eventually(lambda: client.approval_requests("acme"), within=30)
    assert pending.request.tool == "http.post"
    assert pending.request.reasons[0] == (
        "tool http.post sends data out, and this run has read untrusted content (web.fetch)"
    )
    events = await run_events(nc, settings, "acme", receipt.run_id)
    completed = [event.data for event in events if isinstance(event.data, ToolCallCompleted)]
    assert [(call.tool, call.outcome, call.host) for call in completed] == [("web.fetch", "ok", "example.com")]
    asked = next(e.data for e in events if isinstance(e.data, DecisionMade) and e.data.effect == "require_approval")
    assert asked.tool_call_id == pending.request.tool_call_id

    request_row = await eventually(
        lambda: db.fetchrow(
            "SELECT payload FROM events WHERE type = 'tool_call.requested' AND payload->>'tool' = 'http.post'"
        )
    )
    request = ToolCallRequested.model_validate_json(request_row["payload"])
    assert request.history == [CallFact(tool="web.fetch", outcome="ok", host="example.com")]

    answered = await client.answer_approval(
        tenant="acme", approval_id=pending.request.approval_id, actor="dana", approve=True
    )
    assert answered.counted
    run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
    assert run["status"] == "succeeded", run["error"]
    events = await run_events(nc, settings, "acme", receipt.run_id)
    completed = [event.data for event in events if isinstance(event.data, ToolCallCompleted)]
    assert [(call.tool, call.outcome) for call in completed] == [("web.fetch", "ok"), ("http.post", "ok")]
