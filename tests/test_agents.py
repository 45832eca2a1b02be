"""The agent runner's pure core: scripted agents, their definition files, and the built-in tools."""

import json
import time
from pathlib import Path

import pytest
from hypothesis import given
from pydantic import JsonValue

from tests.strategies import scripted_runs
from warden.agent_runner.actions import (
    AgentDefinitionError,
    Fail,
    Finish,
    ModelTurn,
    OnRefusal,
    Outcome,
    StepRecord,
    ToolCall,
    UnknownAgent,
)
from warden.agent_runner.agents import (
    AgentCatalogue,
    ScriptedAgent,
    load_agent,
)
from warden.agent_runner.tools import BUILTIN_TOOLS, ToolError, UnknownTool, run_tool
from warden.errors import PermanentError

AGENTS_DIR = Path(__file__).resolve().parents[1] / "agents"

PLAN = ModelTurn(summary="plan", input_tokens=10, output_tokens=5)
FETCH = ToolCall(tool="web.fetch", arguments={"url": "https://example.com/{input.topic}"})
EXFILTRATE = ToolCall(tool="web.fetch", arguments={"url": "https://evil.example.net/x"})
ANSWER = ModelTurn(summary="answer about {input.topic}")


def script(on_refusal: OnRefusal = "continue", output: JsonValue = None) -> ScriptedAgent:
    return ScriptedAgent(name="t", steps=[PLAN, FETCH, EXFILTRATE, ANSWER], on_refusal=on_refusal, output=output)


def ran(
    step: int, action: ToolCall, outcome: Outcome, result: JsonValue = None, error: str | None = None
) -> StepRecord:
    return StepRecord(step=step, action=action, outcome=outcome, result=result, error=error)


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# --- Scripted agent ---------------------------------------------------------------------------------


def test_scripted_agent_plays_its_steps_in_order_then_finishes() -> None:
    """Each call returns the step after the history, and Finish once every step is in the history."""
    agent = ScriptedAgent(name="t", steps=[PLAN, ToolCall(tool="text.echo", arguments={"text": "hi"})])
    assert agent.next_action({}, []) == PLAN
    history = [StepRecord(step=0, action=PLAN)]
    assert agent.next_action({}, history) == ToolCall(tool="text.echo", arguments={"text": "hi"})
    history.append(ran(1, ToolCall(tool="text.echo", arguments={"text": "hi"}), "ok", result="hi"))
    assert isinstance(agent.next_action({}, history), Finish)


def test_placeholders_are_filled_from_the_run_input() -> None:
    """`{input.KEY}` inside a string is replaced by the input value's text, in arguments and summaries."""
    agent = script()
    history = [StepRecord(step=0, action=PLAN)]
    assert agent.next_action({"topic": "tea"}, history) == ToolCall(
        tool="web.fetch", arguments={"url": "https://example.com/tea"}
    )
    history += [ran(1, FETCH, "ok"), ran(2, EXFILTRATE, "refused", error="denied")]
    assert agent.next_action({"topic": "tea"}, history) == ModelTurn(summary="answer about tea")


def test_a_whole_string_placeholder_keeps_the_input_values_json_type() -> None:
    """An argument that is only a placeholder takes the input value itself, so numbers stay numbers."""
    agent = ScriptedAgent(
        name="t", steps=[ToolCall(tool="math.add", arguments={"a": "{input.a}", "b": ["{input.b}", "n={input.a}"]})]
    )
    action = agent.next_action({"a": 2, "b": {"x": [1.5]}}, [])
    assert action == ToolCall(tool="math.add", arguments={"a": 2, "b": [{"x": [1.5]}, "n=2"]})


def test_a_run_input_missing_a_referenced_key_fails_before_the_first_step() -> None:
    """A missing input key is detected at action time (the input is only known then): Fail naming the key."""
    action = script().next_action({"question": "?"}, [])
    assert isinstance(action, Fail)
    assert "topic" in action.reason


def test_a_malformed_placeholder_is_refused_when_the_script_is_built() -> None:
    """Text that starts a placeholder but is not `{input.KEY}` is an AgentDefinitionError, not literal text."""
    with pytest.raises(AgentDefinitionError, match="malformed placeholder"):
        ScriptedAgent(name="t", steps=[ToolCall(tool="text.echo", arguments={"text": "{input.a.b}"})])


def test_a_refused_call_is_skipped_when_on_refusal_is_continue() -> None:
    """With on_refusal="continue" the script goes on to the step after a refused tool call."""
    history = [StepRecord(step=0, action=PLAN), ran(1, FETCH, "ok"), ran(2, EXFILTRATE, "refused", error="deny")]
    assert isinstance(script("continue").next_action({"topic": "x"}, history), ModelTurn)


def test_a_refused_call_fails_the_run_when_on_refusal_is_fail() -> None:
    """With on_refusal="fail" a refusal as the latest step gives Fail carrying the refusal reason."""
    history = [StepRecord(step=0, action=PLAN), ran(1, FETCH, "ok"), ran(2, EXFILTRATE, "refused", error="host denied")]
    action = script("fail").next_action({"topic": "x"}, history)
    assert isinstance(action, Fail)
    assert "host denied" in action.reason
    assert "web.fetch" in action.reason


def test_finish_summarises_results_refusals_and_errors() -> None:
    """Without a declared output, Finish lists each tool call's result, refusal or error by step."""
    agent = ScriptedAgent(name="t", steps=[PLAN, FETCH, EXFILTRATE, FETCH])
    history = [
        StepRecord(step=0, action=PLAN),
        ran(1, FETCH, "ok", result={"title": "Example Domain"}),
        ran(2, EXFILTRATE, "refused", error="host not allowed"),
        ran(3, FETCH, "error", error="offline"),
    ]
    assert agent.next_action({"topic": "x"}, history) == Finish(
        output={
            "tool_results": [{"step": 1, "tool": "web.fetch", "result": {"title": "Example Domain"}}],
            "refused": [{"step": 2, "tool": "web.fetch", "reason": "host not allowed"}],
            "errors": [{"step": 3, "tool": "web.fetch", "error": "offline"}],
        }
    )


def test_finish_returns_the_declared_output_with_placeholders_filled() -> None:
    """A script's declared output is the Finish output, templated from the run input."""
    agent = ScriptedAgent(name="t", steps=[PLAN], output={"answer": "about {input.topic}"})
    assert agent.next_action({"topic": "tea"}, [StepRecord(step=0, action=PLAN)]) == Finish(
        output={"answer": "about tea"}
    )


def test_a_history_the_script_could_not_produce_fails() -> None:
    """A recorded step of another kind or tool than the script's (a changed definition) gives Fail."""
    agent = script()
    assert isinstance(agent.next_action({"topic": "x"}, [ran(0, FETCH, "ok")]), Fail)
    too_long = [StepRecord(step=n, action=PLAN) for n in range(5)]
    assert isinstance(ScriptedAgent(name="t", steps=[PLAN]).next_action({}, too_long), Fail)


@given(scripted_runs())
def test_next_action_is_a_function_of_input_and_history(
    run: tuple[ScriptedAgent, dict[str, JsonValue], list[StepRecord]],
) -> None:
    """The same input and history give the same action, from the same agent or a fresh copy of it."""
    agent, run_input, history = run
    twin = ScriptedAgent(name=agent.name, steps=agent.steps, on_refusal=agent.on_refusal)
    first = agent.next_action(run_input, history)
    assert agent.next_action(run_input, history) == first
    assert twin.next_action(run_input, list(history)) == first
    if len(history) < len(agent.steps) and not (history and history[-1].outcome == "refused"):
        assert type(first) is type(agent.steps[len(history)])


# --- Definition files ---------------------------------------------------------------------------------


def test_load_agent_reads_a_definition_file(tmp_path: Path) -> None:
    """A valid file becomes a ScriptedAgent with its name, steps, on_refusal and output."""
    path = write(
        tmp_path,
        "a.json",
        {
            "name": "researcher",
            "description": "d",
            "on_refusal": "fail",
            "steps": [
                {"model_turn": {"summary": "plan", "input_tokens": 120, "output_tokens": 40}},
                {"tool_call": {"tool": "web.fetch", "arguments": {"url": "https://example.com/{input.topic}"}}},
            ],
            "output": None,
        },
    )
    agent = load_agent(path)
    assert isinstance(agent, ScriptedAgent)
    assert (agent.name, agent.on_refusal, agent.description) == ("researcher", "fail", "d")
    assert agent.steps == (ModelTurn("plan", 120, 40), FETCH)
    assert agent.input_keys == {"topic"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"name": "a", "steps": [', "not valid JSON"),
        ({"name": "a", "steps": [{"model_turn": {"summary": "s"}}], "colour": "red"}, "colour"),
        ({"name": "a", "steps": [{"model_turn": {"summary": "s", "tokens": 3}}]}, r"steps\[0\].model_turn.tokens"),
        ({"name": "a", "steps": [{"web_search": {"q": "x"}}]}, "exactly one key, 'model_turn' or 'tool_call'"),
        ({"name": "a", "steps": [{"model_turn": {"summary": "s", "input_tokens": "120"}}]}, "input_tokens"),
        ({"name": "a", "steps": []}, "steps"),
        ({"name": "a b", "steps": [{"model_turn": {"summary": "s"}}]}, "name"),
        ({"name": "a", "steps": [{"model_turn": {"summary": "s"}}], "on_refusal": "retry"}, "on_refusal"),
        ({"name": "a", "steps": [{"tool_call": {"tool": "t", "arguments": {"x": "{input.}"}}}]}, "malformed"),
        ('{"name": "a", "steps": [{"tool_call": {"tool": "t", "arguments": {"x": NaN}}}]}', "NaN"),
    ],
    ids=[
        "bad-json",
        "unknown-field",
        "unknown-step-field",
        "unknown-step-kind",
        "string-for-number",
        "no-steps",
        "bad-name",
        "bad-on-refusal",
        "bad-placeholder",
        "nan",
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path: Path, content: object, problem: str) -> None:
    """Every invalid definition raises AgentDefinitionError (permanent) naming the file and what is wrong."""
    path = write(tmp_path, "broken.json", content)
    with pytest.raises(AgentDefinitionError, match=problem) as caught:
        load_agent(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, PermanentError)


def test_load_agent_names_a_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is an AgentDefinitionError naming it."""
    with pytest.raises(AgentDefinitionError, match=r"missing\.json"):
        load_agent(tmp_path / "missing.json")


# --- Catalogue ------------------------------------------------------------------------------------------


def test_catalogue_loads_the_shipped_agents() -> None:
    """agents/ holds demo, researcher and slow, each loadable and with no input keys required."""
    catalogue = AgentCatalogue.load(AGENTS_DIR)
    assert {"demo", "researcher", "slow"} <= set(catalogue.names())
    for name in ("demo", "researcher", "slow"):
        agent = catalogue.get(name)
        assert agent.name == name
        assert not isinstance(agent.next_action({}, []), Fail)


def test_shipped_agents_call_the_tools_they_promise() -> None:
    """demo fetches an allowed and a denied host; researcher makes three tool calls; slow sleeps twice."""
    catalogue = AgentCatalogue.load(AGENTS_DIR)
    demo, researcher, slow = (catalogue.get(name) for name in ("demo", "researcher", "slow"))
    assert isinstance(demo, ScriptedAgent)
    assert isinstance(researcher, ScriptedAgent)
    assert isinstance(slow, ScriptedAgent)
    demo_urls = [str(step.arguments["url"]) for step in demo.steps if isinstance(step, ToolCall)]
    assert demo_urls[0].startswith("https://example.com/")
    assert demo_urls[1].startswith("https://evil.example.net/")
    assert demo.on_refusal == "continue"
    assert [step.tool for step in researcher.steps if isinstance(step, ToolCall)] == [
        "web.fetch",
        "math.add",
        "text.echo",
    ]
    assert [step.tool for step in slow.steps if isinstance(step, ToolCall)] == ["clock.sleep", "clock.sleep"]


async def test_researchers_tool_calls_all_succeed_offline() -> None:
    """Every tool call in the researcher script runs successfully with the built-in tools."""
    researcher = AgentCatalogue.load(AGENTS_DIR).get("researcher")
    assert isinstance(researcher, ScriptedAgent)
    for step in researcher.steps:
        if isinstance(step, ToolCall):
            await run_tool(step.tool, step.arguments)


def test_catalogue_get_unknown_agent_raises(tmp_path: Path) -> None:
    """Asking for an agent the catalogue lacks raises UnknownAgent (permanent) listing the known ones."""
    write(tmp_path, "one.json", {"name": "one", "steps": [{"model_turn": {"summary": "s"}}]})
    catalogue = AgentCatalogue.load(tmp_path)
    assert catalogue.names() == ["one"]
    with pytest.raises(UnknownAgent, match=r"'two'.*one") as caught:
        catalogue.get("two")
    assert isinstance(caught.value, PermanentError)


def test_catalogue_refuses_two_files_defining_one_name(tmp_path: Path) -> None:
    """Two definitions with the same agent name are an error naming both files."""
    for file in ("a.json", "b.json"):
        write(tmp_path, file, {"name": "same", "steps": [{"model_turn": {"summary": "s"}}]})
    with pytest.raises(AgentDefinitionError, match=r"b\.json.*a\.json"):
        AgentCatalogue.load(tmp_path)


def test_catalogue_refuses_a_missing_directory(tmp_path: Path) -> None:
    """Loading from a directory that does not exist is an AgentDefinitionError naming it."""
    with pytest.raises(AgentDefinitionError, match="nowhere"):
        AgentCatalogue.load(tmp_path / "nowhere")


# --- Built-in tools ------------------------------------------------------------------------------------------


async def test_math_add_sums_two_numbers() -> None:
    """math.add returns a + b, keeping integers integral."""
    assert await run_tool("math.add", {"a": 2, "b": 3}) == 5
    assert await run_tool("math.add", {"a": 0.5, "b": 2}) == 2.5


async def test_text_echo_returns_its_text() -> None:
    """text.echo returns the text it was given."""
    assert await run_tool("text.echo", {"text": "héllo"}) == "héllo"


async def test_clock_sleep_really_sleeps() -> None:
    """clock.sleep awaits the requested time and reports it."""
    started = time.monotonic()
    assert await run_tool("clock.sleep", {"seconds": 0.05}) == {"slept": 0.05}
    assert time.monotonic() - started >= 0.05


async def test_web_fetch_answers_known_pages_offline() -> None:
    """web.fetch serves any example.com path and known docs.python.org pages from its built-in table."""
    page = await run_tool("web.fetch", {"url": "https://example.com/anything?q=1"})
    assert isinstance(page, dict)
    assert (page["status"], page["title"], page["offline"]) == (200, "Example Domain", True)
    docs = await run_tool("web.fetch", {"url": "https://docs.python.org/3/library/asyncio.html"})
    assert isinstance(docs, dict)
    assert "asyncio" in str(docs["title"])


@pytest.mark.parametrize(
    ("tool", "arguments", "problem"),
    [
        ("math.add", {"a": 1}, "missing b"),
        ("math.add", {"a": 1, "b": 2, "c": 3}, "unexpected c"),
        ("math.add", {"a": "1", "b": 2}, "'a' must be a finite number"),
        ("math.add", {"a": True, "b": 2}, "'a' must be a finite number"),
        ("math.add", {"a": 1e308, "b": 1e308}, "overflows"),
        ("text.echo", {"text": 5}, "'text' must be a string"),
        ("text.echo", {}, "missing text"),
        ("clock.sleep", {"seconds": 31}, "between 0 and 30"),
        ("clock.sleep", {"seconds": -1}, "between 0 and 30"),
        ("clock.sleep", {"seconds": "1"}, "finite number"),
        ("web.fetch", {"url": "https://evil.example.net/x"}, "offline in this build: no page for URL"),
        ("web.fetch", {"url": "https://docs.python.org/2/"}, "offline in this build"),
        ("web.fetch", {"url": "ftp://example.com/"}, "http or https"),
        ("web.fetch", {"url": "https://[::1/"}, "not a valid URL"),
        ("web.fetch", {"url": ["https://example.com/"]}, "'url' must be a string"),
    ],
)
async def test_tools_reject_bad_arguments_clearly(tool: str, arguments: dict[str, JsonValue], problem: str) -> None:
    """Bad arguments raise ToolError (permanent) whose message names the tool and the problem."""
    with pytest.raises(ToolError, match=problem) as caught:
        await run_tool(tool, arguments)
    assert str(caught.value).startswith(tool)
    assert isinstance(caught.value, PermanentError)


async def test_run_tool_rejects_an_unknown_tool() -> None:
    """An unknown tool name raises UnknownTool, a ToolError listing the built-in tools."""
    with pytest.raises(UnknownTool, match=r"'shell\.exec'.*math\.add") as caught:
        await run_tool("shell.exec", {})
    assert isinstance(caught.value, ToolError)


def test_builtin_tools_are_the_six_documented_ones() -> None:
    """The registry holds exactly math.add, text.echo, clock.sleep, web.fetch, http.post and payments.refund."""
    assert set(BUILTIN_TOOLS) == {"math.add", "text.echo", "clock.sleep", "web.fetch", "http.post", "payments.refund"}


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"order": "A-1"}, "missing amount"),
        ({"order": "A-1", "amount": 0}, "must be more than 0"),
        ({"order": "A-1", "amount": 10_001}, "at most 10000"),
        ({"order": 7, "amount": 5}, "'order' must be a string"),
    ],
)
async def test_payments_refund_checks_its_arguments(arguments: dict[str, JsonValue], problem: str) -> None:
    with pytest.raises(ToolError, match=problem):
        await run_tool("payments.refund", arguments)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"url": "ftp://example.com/x", "body": "b"}, "expected an http or https URL"),
        ({"url": "https://example.com/x"}, "missing body"),
        ({"url": "https://example.com/x", "body": "x" * (64 * 1024 + 1)}, "over 65536"),
    ],
)
async def test_http_post_checks_what_it_would_send(arguments: dict[str, JsonValue], problem: str) -> None:
    """http.post refuses a non-http URL, a missing body and one over its size limit."""
    with pytest.raises(ToolError, match=problem):
        await run_tool("http.post", arguments)


async def test_http_post_is_offline_and_says_what_would_have_gone() -> None:
    """Nothing is sent (no network in this build): the answer says so, with the body's size."""
    result = await run_tool("http.post", {"url": "https://example.com/r", "body": {"report": "ok"}})
    assert result == {"url": "https://example.com/r", "status": 202, "bytes": 16, "offline": True}
