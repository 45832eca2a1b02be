"""The Rego unit-test runner behind `warden policy test`: every `test_*` rule of every `*_test` package.

Apart from the evaluator (`engine`) on purpose: the gate never loads test files, and this runner
reads the same pack the gate would, tests included.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from warden.policy_gate.engine import PolicyLoadError, is_engine_failure, parse_regorus_error, read_pack

TEST_PACKAGE_SUFFIX = "_test"
TEST_RULE_PREFIX = "test_"
EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_LOAD_ERROR = 2


def policy_test_command(directory: Path) -> int:
    """Print a line per test and a summary; exit 0 if all pass, 1 on a failure or no tests, 2 on a load error."""
    try:
        report = run_policy_tests(directory)
    except PolicyLoadError as exc:
        # "file:line:col: message", the shape editors and CI annotations jump to.
        print(exc, file=sys.stderr)
        return EXIT_LOAD_ERROR
    print(report.render())
    return EXIT_PASSED if report.ok else EXIT_FAILED


@dataclass(frozen=True)
class PolicyTestResult:
    """One `test_*` rule's outcome: passed, failed (false or undefined) or errored (engine error)."""

    name: str  # package-qualified, without the "data." prefix: warden.authz_test.test_x
    file: str
    outcome: Literal["pass", "fail", "error"]
    message: str = ""
    duration_ms: float = 0.0


@dataclass(frozen=True)
class PolicyTestReport:
    """Every policy unit test's outcome, in file and line order."""

    results: tuple[PolicyTestResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> list[PolicyTestResult]:
        return [r for r in self.results if r.outcome == "pass"]

    @property
    def failed(self) -> list[PolicyTestResult]:
        return [r for r in self.results if r.outcome == "fail"]

    @property
    def errored(self) -> list[PolicyTestResult]:
        return [r for r in self.results if r.outcome == "error"]

    @property
    def ok(self) -> bool:
        """True when at least one test ran and none failed or errored."""
        return bool(self.results) and not self.failed and not self.errored

    def render(self) -> str:
        lines = []
        for result in self.results:
            line = f"{result.outcome.upper()} {result.name} ({result.file})"
            lines.append(f"{line}: {result.message}" if result.message else line)
        summary = f"{len(self.passed)} passed, {len(self.failed)} failed"
        if self.errored:
            summary += f", {len(self.errored)} errored"
        if not self.results:
            summary += " (no test_* rules found in packages ending in _test)"
        lines.append(summary)
        return "\n".join(lines)


@dataclass(frozen=True)
class PolicyTestRule:
    """One `test_*` rule of a `*_test` package, where it starts."""

    package: str  # without "data."
    name: str
    file: str
    line: int


def _ref_path(ref: Mapping[str, Any]) -> list[str] | None:
    """Flatten a regorus AST reference (`a.b.c`) to its names; None for anything else."""
    if "Var" in ref:
        return [str(ref["Var"]["value"])]
    if "RefDot" in ref:
        inner = _ref_path(ref["RefDot"]["refr"])
        return None if inner is None else [*inner, str(ref["RefDot"]["field"][1])]
    return None


def find_test_rules(engine: Any) -> list[PolicyTestRule]:
    """Every `test_*` rule of every `*_test` package loaded into a regorus engine, in file and line order."""
    # Discovered from regorus's AST rather than by scanning text, so a `test_` inside a string or
    # comment is never mistaken for a rule.
    rules: dict[tuple[str, str], PolicyTestRule] = {}
    for module in json.loads(engine.get_ast_as_json()):
        ast = module["ast"]
        package_path = _ref_path(ast["package"]["refr"])
        if package_path is None:
            continue
        package = ".".join(package_path)
        if not package.endswith(TEST_PACKAGE_SUFFIX):
            continue
        for rule in ast["rules"]:
            spec = rule.get("Spec")
            head = spec["head"].get("Compr") if spec else None  # `name if ...` / `name := ...`, not functions
            if head is None:
                continue
            path = _ref_path(head["refr"])
            if path is None or len(path) != 1 or not path[0].startswith(TEST_RULE_PREFIX):
                continue
            key = (package, path[0])
            # A test may be written as several rule bodies; it is one test, reported where it starts.
            rules.setdefault(key, PolicyTestRule(package, path[0], module["source"]["file"], int(head["span"]["line"])))
    return sorted(rules.values(), key=lambda r: (r.file, r.line))


def run_policy_tests(directory: Path) -> PolicyTestReport:
    """Load the pack with its `*_test.rego` files and evaluate every `test_*` rule in a `*_test` package.

    A test passes when its rule is defined and not false. Raises PolicyLoadError when any file,
    tests included, does not parse.
    """
    engine = read_pack(directory, include_tests=True).build_engine()
    results = []
    for test in find_test_rules(engine):
        name = f"{test.package}.{test.name}"
        started = time.perf_counter()
        try:
            value = engine.eval_rule(f"data.{name}")
        except BaseException as exc:
            if not is_engine_failure(exc):
                raise
            outcome: Literal["pass", "fail", "error"] = "error"
            message = parse_regorus_error(exc).render()
        else:
            outcome = "fail" if value is None or value is False else "pass"
            message = "" if outcome == "pass" else ("undefined" if value is None else "false")
        duration_ms = (time.perf_counter() - started) * 1000.0
        results.append(PolicyTestResult(name, test.file, outcome, message, duration_ms))
    return PolicyTestReport(tuple(results))
