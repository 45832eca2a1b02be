"""`warden policy test`: run the policy pack's Rego unit tests and report each one."""

import sys
from pathlib import Path

from warden.policy_gate.engine import PolicyLoadError, run_policy_tests

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
