"""The policy pack and its engine: Rego unit tests, decisions, revisions, and how failures surface."""

import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from warden.policy_gate.engine import PolicyEngine, PolicyEvaluationError, PolicyLoadError, PolicyResult
from warden.policy_gate.policy_tests import policy_test_command, run_policy_tests

POLICIES = Path(__file__).resolve().parent.parent / "policies"
# The pack ships this many Rego tests or more; fewer means tests went missing, not that all passed.
MIN_REGO_TESTS = 30


def run_start(principal: str = "alice", agent: str = "researcher", tenant: str = "acme") -> dict[str, Any]:
    return {
        "action": "run.start",
        "tenant": tenant,
        "principal": principal,
        "agent": agent,
        "tool": None,
        "run": {"id": "R1", "usage": {"steps": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0}},
    }


def tool_call(
    tool: str, arguments: dict[str, Any], *, agent: str = "researcher", principal: str = "alice", tool_calls: int = 0
) -> dict[str, Any]:
    return {
        "action": "tool.call",
        "tenant": "acme",
        "principal": principal,
        "agent": agent,
        "tool": {"name": tool, "arguments": arguments},
        "run": {"id": "R1", "usage": {"steps": 1, "tool_calls": tool_calls, "input_tokens": 0, "output_tokens": 0}},
    }


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load(POLICIES)


@pytest.fixture
def pack(tmp_path: Path) -> Path:
    """A private copy of the policy pack that a test may edit."""
    return Path(shutil.copytree(POLICIES, tmp_path / "policies"))


def write_pack(directory: Path, policy: str, data: str = "{}") -> Path:
    directory.mkdir()
    (directory / "authz.rego").write_text(policy)
    (directory / "data.json").write_text(data)
    return directory


# --- The Rego unit tests ---------------------------------------------------------------------


def test_rego_unit_tests_pass() -> None:
    """Every test_* rule in the shipped pack passes, and the expected number of them ran."""
    report = run_policy_tests(POLICIES)
    assert report.failed == [], report.render()
    assert report.errored == [], report.render()
    assert len(report.passed) >= MIN_REGO_TESTS, report.render()
    assert report.ok


def test_report_names_each_test_with_its_file() -> None:
    """The rendered report has a PASS line per test naming package, rule and file, then a summary."""
    report = run_policy_tests(POLICIES)
    lines = report.render().splitlines()
    assert f"PASS warden.authz_test.test_operator_may_run_researcher ({POLICIES / 'runs_test.rego'})" in lines
    assert lines[-1] == f"{len(report.passed)} passed, 0 failed"


def test_failing_and_erroring_rego_tests_are_reported(pack: Path) -> None:
    """A false test is FAIL, an undefined one is FAIL, an engine error is ERROR with its location."""
    (pack / "broken_test.rego").write_text(
        "package warden.broken_test\n\nimport rego.v1\n\n"
        "test_false if 1 == 2\n\n"
        'test_undefined if input.nothing == "here"\n\n'
        'test_error if to_number("not a number") == 1\n'
    )
    report = run_policy_tests(pack)
    failed = {r.name: r.message for r in report.failed}
    assert failed == {"warden.broken_test.test_false": "undefined", "warden.broken_test.test_undefined": "undefined"}
    (errored,) = report.errored
    assert errored.name == "warden.broken_test.test_error"
    assert errored.message.startswith(f"{pack / 'broken_test.rego'}:9:")
    assert not report.ok
    assert report.render().splitlines()[-1].endswith("2 failed, 1 errored")


# --- Decisions ---------------------------------------------------------------------------------


def test_operator_may_start_researcher(engine: PolicyEngine) -> None:
    """An operator may run researcher, and the reason names the principal, tenant, roles and agent."""
    result = engine.evaluate(run_start())
    assert isinstance(result, PolicyResult)
    assert result.effect == "allow"
    assert result.reasons == ("principal alice in tenant acme has roles [operator]; operator may run researcher",)


def test_viewer_is_denied_with_a_reason(engine: PolicyEngine) -> None:
    """A viewer may run no agent; the deny says which roles the principal has."""
    result = engine.evaluate(run_start(principal="bob"))
    assert result.effect == "deny"
    assert result.reasons == ("principal bob in tenant acme has roles [viewer]; none of them may run researcher",)


def test_unknown_principal_is_denied(engine: PolicyEngine) -> None:
    """A principal the tenant does not list is denied, even one known in another tenant."""
    assert engine.evaluate(run_start(principal="mallory")).reasons == ("principal mallory is not known in tenant acme",)
    assert engine.evaluate(run_start(tenant="globex")).reasons == ("principal alice is not known in tenant globex",)


def test_unknown_tenant_is_denied(engine: PolicyEngine) -> None:
    """A tenant the data does not list is denied with that reason."""
    result = engine.evaluate(run_start(tenant="initech"))
    assert (result.effect, result.reasons) == ("deny", ("unknown tenant initech",))


def test_tool_outside_the_agents_allowlist_is_denied(engine: PolicyEngine) -> None:
    """An agent may call only the tools its allowlist names."""
    result = engine.evaluate(tool_call("clock.sleep", {"seconds": 1}, agent="demo"))
    assert (result.effect, result.reasons) == ("deny", ("tool clock.sleep is not allowed for agent demo",))


def test_tool_call_on_the_allowlist_is_allowed(engine: PolicyEngine) -> None:
    """An allowed tool call lists every rule that granted it."""
    result = engine.evaluate(tool_call("math.add", {"a": 1, "b": 2}, tool_calls=1))
    assert result.effect == "allow"
    assert "tool math.add is allowed for agent researcher" in result.reasons
    assert "tool call 2 of at most 20 for run R1" in result.reasons


@pytest.mark.parametrize(
    "url",
    ["https://example.com/x", "http://www.example.com", "https://DOCS.python.org:443/3/", "https://example.com./"],
)
def test_urls_on_allowed_domains_are_allowed(engine: PolicyEngine, url: str) -> None:
    """web.fetch may fetch from an allowed domain or a subdomain, whatever the case, port or trailing dot."""
    assert engine.evaluate(tool_call("web.fetch", {"url": url})).effect == "allow"


@pytest.mark.parametrize(
    ("url", "host"),
    [("https://evil.com/x", "evil.com"), ("https://example.com.evil.net/", "example.com.evil.net"),
     ("https://notexample.com/", "notexample.com"), ("https://evil.example.net/exfiltrate", "evil.example.net")],
)  # fmt: skip
def test_hosts_outside_allowed_domains_are_denied(engine: PolicyEngine, url: str, host: str) -> None:
    """A host that only looks like an allowed domain is denied, and the reason names the host."""
    result = engine.evaluate(tool_call("web.fetch", {"url": url}))
    assert result.effect == "deny"
    assert result.reasons == (f"host {host} is not in web.fetch's allowed domains [example.com, docs.python.org]",)


@pytest.mark.parametrize(
    "url", ["https://example.com@evil.com/", "https://evil.com\\@example.com/", "ftp://example.com/", "example.com", 7]
)
def test_urls_without_a_plain_http_host_are_denied(engine: PolicyEngine, url: object) -> None:
    """Userinfo, backslashes, other schemes and non-strings are refused rather than parsed."""
    result = engine.evaluate(tool_call("web.fetch", {"url": url}))
    assert result.effect == "deny"
    assert result.reasons == ("tool web.fetch needs a url argument that is an http(s) url with a plain host name",)


def test_tool_calls_are_capped_per_run(engine: PolicyEngine) -> None:
    """A call is allowed below the cap and denied once the run has made as many calls as the cap."""
    assert engine.evaluate(tool_call("math.add", {}, agent="demo", tool_calls=9)).effect == "allow"
    result = engine.evaluate(tool_call("math.add", {}, agent="demo", tool_calls=10))
    assert (result.effect, result.reasons) == (
        "deny",
        ("run R1 has already made 10 tool calls; agent demo may make at most 10 per run",),
    )
    # researcher has its own cap of 20.
    assert engine.evaluate(tool_call("math.add", {}, tool_calls=10)).effect == "allow"


def test_refund_requires_approval(engine: PolicyEngine) -> None:
    """A tool marked requires_approval gives require_approval, first reason saying so."""
    result = engine.evaluate(tool_call("payments.refund", {"amount": 5}, agent="refunds", principal="carol"))
    assert result.effect == "require_approval"
    assert result.reasons[0] == "tool payments.refund requires human approval"


def test_evaluation_time_is_reported(engine: PolicyEngine) -> None:
    """Every result carries how long the evaluation took, in milliseconds."""
    result = engine.evaluate(run_start())
    assert 0 < result.evaluation_ms < 1000


def test_catalogue_lookups(engine: PolicyEngine) -> None:
    """knows_agent and knows_tool answer from data.warden.agents and data.warden.tools."""
    assert engine.knows_agent("researcher")
    assert not engine.knows_agent("nosuchagent")
    assert all(engine.knows_tool(t) for t in ["math.add", "text.echo", "web.fetch", "clock.sleep"])
    assert not engine.knows_tool("shell.exec")


def test_engine_works_from_another_thread(engine: PolicyEngine) -> None:
    """A thread other than the loader's gets a decision too (regorus engines are bound to one thread)."""
    results: list[PolicyResult] = []
    worker = threading.Thread(target=lambda: results.append(engine.evaluate(run_start())))
    worker.start()
    worker.join()
    assert [r.effect for r in results] == ["allow"]
    assert engine.evaluate(run_start(principal="bob")).effect == "deny"


# --- Revisions ---------------------------------------------------------------------------------


def test_revision_is_a_short_sha256_and_stable(engine: PolicyEngine) -> None:
    """The revision is "sha256:" and 16 hex digits, the same each time the same files load."""
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", engine.revision)
    assert PolicyEngine.load(POLICIES).revision == engine.revision


def test_revision_changes_when_a_policy_changes(pack: Path, engine: PolicyEngine) -> None:
    """Editing a policy file, even only a comment, gives a new revision."""
    assert PolicyEngine.load(pack).revision == engine.revision
    with (pack / "tools.rego").open("a") as file:
        file.write("\n# edited\n")
    assert PolicyEngine.load(pack).revision != engine.revision


def test_revision_changes_when_data_changes(pack: Path, engine: PolicyEngine) -> None:
    """Editing data.json gives a new revision, and the new data decides."""
    data = pack / "data.json"
    data.write_text(data.read_text().replace('"viewer": {"agents": []}', '"viewer": {"agents": ["researcher"]}'))
    changed = PolicyEngine.load(pack)
    assert changed.revision != engine.revision
    assert changed.evaluate(run_start(principal="bob")).effect == "allow"


def test_revision_ignores_test_files(pack: Path, engine: PolicyEngine) -> None:
    """Rego test files are not loaded by the gate, so editing them keeps the revision."""
    with (pack / "runs_test.rego").open("a") as file:
        file.write("\n# edited\n")
    assert PolicyEngine.load(pack).revision == engine.revision


# --- Load errors -------------------------------------------------------------------------------


def test_syntax_error_names_file_line_and_column(pack: Path) -> None:
    """A policy that does not parse is a PolicyLoadError carrying its file, line and column."""
    broken = pack / "tools.rego"
    # The line that defines tool_call gains a stray ")" in column 41.
    text = broken.read_text().replace(
        'tool_call if input.action == "tool.call"\n', 'tool_call if input.action == "tool.call")\n'
    )
    broken.write_text(text)
    line = text.splitlines().index('tool_call if input.action == "tool.call")') + 1

    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load(pack)
    error = caught.value
    assert error.file == str(broken)
    assert (error.line, error.column) == (line, 41)
    assert str(error) == f"{broken}:{line}:41: {error.message}"
    assert "Stack backtrace" not in str(error)


def test_v0_syntax_is_refused(tmp_path: Path) -> None:
    """Rego v0 syntax (a rule body without `if`) does not load: the pack is Rego v1."""
    pack = write_pack(tmp_path / "p", "package warden.authz\n\nallow { true }\n")
    with pytest.raises(PolicyLoadError, match=r"authz\.rego:3:7: `if` keyword is required"):
        PolicyEngine.load(pack)


def test_syntax_error_in_a_test_file_stops_the_tests(pack: Path) -> None:
    """run_policy_tests loads test files too, so a broken one is a PolicyLoadError naming it."""
    (pack / "bad_test.rego").write_text("package warden.bad_test\n\nimport rego.v1\n\ntest_x if {\n")
    with pytest.raises(PolicyLoadError) as caught:
        run_policy_tests(pack)
    assert (caught.value.file, caught.value.line) == (str(pack / "bad_test.rego"), 6)


def test_invalid_data_json_names_line_and_column(pack: Path) -> None:
    """A data.json that is not JSON is a PolicyLoadError at the offending position."""
    (pack / "data.json").write_text('{\n  "warden": {,}\n}\n')
    with pytest.raises(PolicyLoadError) as caught:
        PolicyEngine.load(pack)
    assert (caught.value.file, caught.value.line, caught.value.column) == (str(pack / "data.json"), 2, 14)


@pytest.mark.parametrize(("data", "message"), [("[1]", "must hold a JSON object"), (None, "missing")])
def test_data_must_be_a_json_object_that_exists(pack: Path, data: str | None, message: str) -> None:
    """data.json is required and must be an object, since it becomes the root of data."""
    if data is None:
        (pack / "data.json").unlink()
    else:
        (pack / "data.json").write_text(data)
    with pytest.raises(PolicyLoadError, match=message):
        PolicyEngine.load(pack)


def test_pack_without_the_decision_package_is_refused(tmp_path: Path) -> None:
    """A pack that declares no warden.authz package could never decide, so it does not load."""
    pack = write_pack(tmp_path / "p", "package other\n\nimport rego.v1\n\nx := 1\n")
    with pytest.raises(PolicyLoadError, match=r"no policy file declares package warden\.authz"):
        PolicyEngine.load(pack)


# --- Evaluation errors -------------------------------------------------------------------------


def test_undefined_decision_is_an_evaluation_error(tmp_path: Path) -> None:
    """When no rule defines the decision for an input, evaluate raises rather than guessing."""
    pack = write_pack(
        tmp_path / "p",
        'package warden.authz\n\nimport rego.v1\n\ndecision := {"effect": "allow", "reasons": ["x"]} if input.ok\n',
    )
    engine = PolicyEngine.load(pack)
    assert engine.evaluate({"ok": True}).effect == "allow"
    with pytest.raises(PolicyEvaluationError, match=r"data\.warden\.authz\.decision is undefined"):
        engine.evaluate({"ok": False})


@pytest.mark.parametrize(
    ("value", "message"),
    [('"allow"', "must be an object"), ('{"effect": "maybe", "reasons": []}', "effect must be one of"),
     ('{"effect": "allow", "reasons": "x"}', "reasons must be a list of strings"),
     ('{"effect": "allow", "reasons": [1]}', "reasons must be a list of strings")],
)  # fmt: skip
def test_malformed_decision_is_an_evaluation_error(tmp_path: Path, value: str, message: str) -> None:
    """A decision that is not {"effect": allow|deny|require_approval, "reasons": [strings]} raises."""
    pack = write_pack(tmp_path / "p", f"package warden.authz\n\nimport rego.v1\n\ndecision := {value}\n")
    with pytest.raises(PolicyEvaluationError, match=message):
        PolicyEngine.load(pack).evaluate({})


def test_engine_failure_is_an_evaluation_error_with_location(tmp_path: Path) -> None:
    """A builtin failing mid-evaluation raises PolicyEvaluationError naming the policy position."""
    pack = write_pack(
        tmp_path / "p",
        "package warden.authz\n\nimport rego.v1\n\n"
        'decision := {"effect": "allow", "reasons": [sprintf("%v", [to_number(input.n)])]}\n',
    )
    engine = PolicyEngine.load(pack)
    assert engine.evaluate({"n": "3"}).reasons == ("3",)
    with pytest.raises(PolicyEvaluationError, match=r"authz\.rego:5:\d+: could not parse string as number") as caught:
        engine.evaluate({"n": "three"})
    assert "Stack backtrace" not in str(caught.value)


def test_conflicting_rules_are_an_evaluation_error(tmp_path: Path) -> None:
    """Two definitions giving the decision different values is an error, not a pick of one."""
    pack = write_pack(
        tmp_path / "p",
        "package warden.authz\n\nimport rego.v1\n\n"
        'decision := {"effect": "allow", "reasons": []} if input.a\n\n'
        'decision := {"effect": "deny", "reasons": []} if input.b\n',
    )
    with pytest.raises(PolicyEvaluationError, match="rule conflicts"):
        PolicyEngine.load(pack).evaluate({"a": True, "b": True})


def test_input_that_is_not_json_is_an_evaluation_error(engine: PolicyEngine) -> None:
    """An input value regorus cannot take (not JSON-like) raises PolicyEvaluationError."""
    with pytest.raises(PolicyEvaluationError):
        engine.evaluate({"action": object()})


# --- The CLI command ---------------------------------------------------------------------------


def test_policy_test_command_passes_on_the_shipped_pack(capsys: pytest.CaptureFixture[str]) -> None:
    """`warden policy test` exits 0 and prints the report when every test passes."""
    assert policy_test_command(POLICIES) == 0
    assert capsys.readouterr().out.rstrip().endswith("passed, 0 failed")


def test_policy_test_command_fails_when_a_test_fails(pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A failing test rule makes the command exit 1 and print a FAIL line for it."""
    (pack / "wrong_test.rego").write_text(
        "package warden.wrong_test\n\nimport rego.v1\n\nimport data.warden.authz\n\n"
        'test_viewer_may_run_researcher if authz.decision.effect == "allow" with input as {\n'
        '\t"action": "run.start", "tenant": "acme", "principal": "bob", "agent": "researcher",\n'
        "}\n"
    )
    assert policy_test_command(pack) == 1
    out = capsys.readouterr().out
    assert f"FAIL warden.wrong_test.test_viewer_may_run_researcher ({pack / 'wrong_test.rego'})" in out
    assert out.rstrip().endswith("passed, 1 failed")


def test_policy_test_command_reports_load_errors(pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that does not parse makes the command exit 2 and print file:line:col: message."""
    (pack / "runs.rego").write_text("package warden.authz\n\nimport rego.v1\n\nallowed if {\n")
    assert policy_test_command(pack) == 2
    assert re.fullmatch(rf"{re.escape(str(pack / 'runs.rego'))}:6:1: .+\n", capsys.readouterr().err)


def corpus() -> list[dict[str, Any]]:
    """Requests across the pack's data: every principal, agent and tool, good and bad URLs, usage at the cap."""
    principals = [("acme", "alice"), ("acme", "bob"), ("acme", "carol"), ("globex", "gina"), ("globex", "hank"),
                  ("acme", "mallory"), ("initech", "alice")]  # fmt: skip
    agents = ["demo", "researcher", "slow", "refunds", "nosuch"]
    tools = ["math.add", "text.echo", "web.fetch", "clock.sleep", "payments.refund", "nosuch.tool"]
    urls = ["https://example.com/x", "https://www.example.com:8443/", "https://example.com.evil.net/",
            "https://example.com@evil.com/", "ftp://example.com/", "not a url"]  # fmt: skip
    requests = []
    for tenant, principal in principals:
        for agent in agents:
            requests.append(run_start(principal, agent, tenant))
            for tool in tools:
                for calls in (0, 9, 10, 20):
                    requests.append({**tool_call(tool, {"a": 1, "b": 2}, agent=agent, principal=principal,
                                                 tool_calls=calls), "tenant": tenant})  # fmt: skip
            for url in urls:
                requests.append({**tool_call("web.fetch", {"url": url}, agent=agent, principal=principal),
                                 "tenant": tenant})  # fmt: skip
            # The secret `authorization` argument: concealed as the runner does, in clear, or a fake.
            for secret in ("hmac-sha256:" + "ab" * 32, "Bearer s3cr3t", "hmac-sha256:short", 42):
                arguments = {"url": urls[0], "authorization": secret}
                requests.append({**tool_call("web.fetch", arguments, agent=agent, principal=principal),
                                 "tenant": tenant})  # fmt: skip
    # Policy changes: the installation's administrator, others of its tenant, other tenants' principals.
    for tenant, principal in [("_warden", "operator"), ("_warden", "auditor"), ("_warden", "mallory"), *principals]:
        for change in ("shadow", "promote", "rollback", "withdraw", None):
            policy = {"change": change, "revision": None, "reason": ""} if change else None
            requests.append({"action": "policy.change", "tenant": tenant, "principal": principal, "agent": None,
                             "tool": None, "model": None, "run": None, "policy": policy})  # fmt: skip
    return requests


def test_compiled_decisions_equal_the_interpreters(engine: PolicyEngine) -> None:
    """The gate's fast path (regorus's VM) decides exactly as the interpreter, the reference, does."""
    requests = corpus()
    assert len(requests) > 1000
    effects = set()
    for request in requests:
        compiled, interpreted = engine.evaluate(request), engine.evaluate_interpreted(request)
        assert (compiled.effect, compiled.reasons) == (interpreted.effect, interpreted.reasons), request
        effects.add(compiled.effect)
    assert effects == {"allow", "deny", "require_approval"}


def test_a_reason_printing_an_undefined_value_is_left_out_as_the_interpreter_does(tmp_path: Path) -> None:
    """Where the compiled VM prints "<undefined>" into a reason, the gate's decision is the interpreter's."""
    pack = write_pack(
        tmp_path / "p",
        "package warden.authz\n\nimport rego.v1\n\n"
        'decision := {"effect": "deny", "reasons": sort(deny)}\n\n'
        'deny contains "always"\n\n'
        'deny contains sprintf("unknown tool %s", [input.tool.name]) if not input.known\n',
    )
    engine = PolicyEngine.load(pack)
    assert engine.evaluate({}).reasons == engine.evaluate_interpreted({}).reasons == ("always",)
    assert engine.evaluate({"tool": {"name": "x"}}).reasons == ("always", "unknown tool x")


def test_a_policy_file_sorting_before_authz_keeps_the_tests_passing(pack: Path) -> None:
    """A pack file loaded before authz.rego leaves every Rego test passing (tests name data.warden.authz in full)."""
    (pack / "aaa.rego").write_text('package warden.authz\n\nimport rego.v1\n\nextra_rule if input.action == "x"\n')
    report = run_policy_tests(pack)
    assert report.failed == [], report.render()
    assert report.ok
