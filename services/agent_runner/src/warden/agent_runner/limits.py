"""Time limits from the policy data: each run's deadline, each tool call's timeout and retries.

Declared beside the rules that use them (`data.warden.limits`, `agents.<agent>.deadline_seconds`,
`tools.<tool>.timeout_seconds`, `tools.<tool>.retries`); the runner enforces them, since only it sees time pass. A run's
own `timeout_seconds` (from its submission) and the policy's deadline both apply: the stricter wins.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden.agent_runner.policy_data import read_policy_data

DEFAULT_RUN_DEADLINE_SECONDS = 3600.0
DEFAULT_TOOL_TIMEOUT_SECONDS = 60.0
MAX_TOOL_RETRIES = 10


def _seconds(value: Any, default: float) -> float:
    # bool is an int in Python, not a number of seconds.
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


@dataclass(frozen=True)
class TimeLimits:
    """The deadlines and timeouts one policy pack declares."""

    run_deadline_seconds: float = DEFAULT_RUN_DEADLINE_SECONDS
    tool_timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS
    agent_deadlines: Mapping[str, float] | None = None
    tool_timeouts: Mapping[str, float] | None = None
    tool_retries: Mapping[str, int] | None = None

    @classmethod
    def from_policy_dir(cls, directory: Path) -> "TimeLimits":
        return cls.from_policy_data(read_policy_data(directory))

    @classmethod
    def from_policy_data(cls, warden: Mapping[str, Any]) -> "TimeLimits":
        """From `data.warden` (see warden.agent_runner.policy_data)."""
        limits = warden.get("limits", {})

        def declared(section: str, key: str) -> dict[str, float]:
            entries = warden.get(section, {})
            return {
                name: _seconds(entry[key], 0.0)
                for name, entry in entries.items()
                if isinstance(entry, dict) and _seconds(entry.get(key), 0.0) > 0
            }

        return cls(
            run_deadline_seconds=_seconds(limits.get("run_deadline_seconds"), DEFAULT_RUN_DEADLINE_SECONDS),
            tool_timeout_seconds=_seconds(limits.get("tool_timeout_seconds"), DEFAULT_TOOL_TIMEOUT_SECONDS),
            agent_deadlines=declared("agents", "deadline_seconds"),
            tool_timeouts=declared("tools", "timeout_seconds"),
            tool_retries={
                name: min(int(entry["retries"]), MAX_TOOL_RETRIES)
                for name, entry in warden.get("tools", {}).items()
                if isinstance(entry, dict) and _seconds(entry.get("retries"), 0.0) >= 1
            },
        )

    def run_deadline(self, agent: str, submitted: float | None) -> tuple[float, str]:
        """A run's time limit in seconds, and where it comes from: the stricter of the policy's and the run's own."""
        policy = (self.agent_deadlines or {}).get(agent, self.run_deadline_seconds)
        if submitted is not None and submitted < policy:
            return submitted, "the run's own timeout_seconds"
        return policy, f"the policy's deadline for agent {agent}"

    def tool_timeout(self, tool: str) -> float:
        return (self.tool_timeouts or {}).get(tool, self.tool_timeout_seconds)

    def retries(self, tool: str) -> int:
        """How many more times a call of `tool` that failed in a way that may pass is tried (0: never)."""
        return (self.tool_retries or {}).get(tool, 0)
