"""The policy pack's data as the agent runner reads it: what it enforces itself (prices, time limits)."""

import json
from pathlib import Path
from typing import Any

from warden.errors import PermanentError
from warden.secret_arguments import POLICY_DATA_FILE


def read_policy_data(directory: Path) -> dict[str, Any]:
    """`data.warden` of the pack in `directory`; `PermanentError` naming the file when it cannot be read."""
    data_file = directory / POLICY_DATA_FILE
    try:
        warden = json.loads(data_file.read_text(encoding="utf-8")).get("warden", {})
    except (OSError, ValueError, AttributeError) as error:
        raise PermanentError(f"cannot read the policy data {data_file}: {error}") from error
    return warden if isinstance(warden, dict) else {}
