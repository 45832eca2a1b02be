"""The policy pack on OPA's own engine: its Rego unit tests pass there, and OPA decides as regorus does.

OPA runs in-process from the `opa` dependency group (`opa-golib-python-bindings`, OPA's Go engine
behind a ctypes wrapper; pyproject.toml says how it is installed on Python 3.11). The wheels exist
for Linux and macOS on x86_64 and arm64; elsewhere this module is skipped, never on those.
"""

import platform
import sys
from typing import Any

import pytest
from hypothesis import given, settings

from tests.strategies import policy_inputs
from tests.test_policies import POLICIES, corpus, run_start, tool_call
from warden.policy_gate.engine import DECISION_QUERY, PolicyEngine, PolicyEvaluationError, read_pack
from warden.policy_gate.policy_tests import find_test_rules

_WHEEL_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "x86_64"), ("darwin", "arm64")}
if (sys.platform, platform.machine()) not in _WHEEL_PLATFORMS:
    pytest.skip("opa-golib-python-bindings ships no wheel for this platform", allow_module_level=True)

from opa_bindings import OpaEngine, OpaError, OpaUndefinedError  # noqa: E402  (after the platform check)

# What a request's decision is, whichever engine gave it: the effect and reasons, or that there was none.
Outcome = tuple[str, tuple[str, ...]]
NO_DECISION: Outcome = ("no decision", ())


def load_into_opa(*, include_tests: bool) -> OpaEngine:
    """The files the gate loads (engine.read_pack), by the same names, with data.json as the root of data."""
    pack = read_pack(POLICIES, include_tests=include_tests)
    engine = OpaEngine()
    for source in pack.policies:
        engine.add_policy(source.relative_path, source.content.decode())
    engine.add_data(dict(pack.data))
    return engine


@pytest.fixture(scope="module")
def opa() -> OpaEngine:
    return load_into_opa(include_tests=False)


@pytest.fixture(scope="module")
def regorus() -> PolicyEngine:
    return PolicyEngine.load(POLICIES)


def opa_decision(opa: OpaEngine, request: dict[str, Any]) -> Outcome:
    try:
        value = opa.eval_document(DECISION_QUERY.removeprefix("data."), request)
    except OpaUndefinedError:
        return NO_DECISION
    return value["effect"], tuple(value["reasons"])


def regorus_decisions(regorus: PolicyEngine, request: dict[str, Any]) -> tuple[Outcome, Outcome]:
    """The gate's decision (the compiled VM first) and the interpreter's."""
    outcomes = []
    for evaluate in (regorus.evaluate, regorus.evaluate_interpreted):
        try:
            result = evaluate(request)
        except PolicyEvaluationError:
            outcomes.append(NO_DECISION)
        else:
            outcomes.append((result.effect, result.reasons))
    return outcomes[0], outcomes[1]


def test_rego_unit_tests_pass_on_opa() -> None:
    """Every test_* rule the regorus runner finds is defined and true on OPA too."""
    rules = find_test_rules(read_pack(POLICIES, include_tests=True).build_engine())
    assert len(rules) >= 30
    opa = load_into_opa(include_tests=True)
    outcomes = {}
    for rule in rules:
        try:
            outcomes[f"{rule.package}.{rule.name}"] = opa.eval_document(f"{rule.package}.{rule.name}")
        except OpaUndefinedError:
            outcomes[f"{rule.package}.{rule.name}"] = "undefined"
        except OpaError as exc:
            outcomes[f"{rule.package}.{rule.name}"] = f"error: {exc}"
    assert {name: value for name, value in outcomes.items() if value is not True} == {}


def test_opa_decides_the_readme_example(opa: OpaEngine) -> None:
    """The decision the README shows for alice running researcher is OPA's too."""
    request = run_start()
    assert opa_decision(opa, request) == (
        "allow",
        ("principal alice in tenant acme has roles [operator]; operator may run researcher",),
    )


def test_opa_decides_the_corpus_as_regorus_does(opa: OpaEngine, regorus: PolicyEngine) -> None:
    """Every request of the policy tests' corpus (each principal, agent and tool) gets one decision from all three."""
    effects = set()
    for request in corpus():
        on_opa = opa_decision(opa, request)
        assert regorus_decisions(regorus, request) == (on_opa, on_opa), request
        effects.add(on_opa[0])
    assert effects == {"allow", "deny", "require_approval"}


@pytest.mark.parametrize(
    ("url", "effect"),
    [("https://\u0130nfo.example.com/", "deny"), ("https://ev\u0130l.example.com/", "deny"),
     ("https://docs.pyth\u0131n.org/", "deny"), ("https://ex\u212aample.com/", "deny"),
     ("HTTPS://WWW.EXAMPLE.COM/", "allow")],
)  # fmt: skip
def test_non_ascii_hosts_are_refused_by_both_engines(
    opa: OpaEngine, regorus: PolicyEngine, url: str, effect: str
) -> None:
    """A host with a letter that lowers to ASCII in OPA (U+0130 to "i") is no allowed host on either engine."""
    request = tool_call("web.fetch", {"url": url})
    on_opa = opa_decision(opa, request)
    assert on_opa[0] == effect
    assert regorus_decisions(regorus, request) == (on_opa, on_opa)


@settings(max_examples=500, deadline=None)
@given(request=policy_inputs())
def test_opa_decides_generated_requests_as_regorus_does(
    opa: OpaEngine, regorus: PolicyEngine, request: dict[str, Any]
) -> None:
    """Hostile requests for every action (fields missing or mistyped, non-ASCII hosts, huge numbers) decide alike."""
    on_opa = opa_decision(opa, request)
    assert on_opa != NO_DECISION, request  # the pack's default decision makes it defined for any input
    assert regorus_decisions(regorus, request) == (on_opa, on_opa)
