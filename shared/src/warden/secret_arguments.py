"""Tool arguments that policy data marks secret: recorded only as a keyed hash, never in clear.

Policy data names them per tool, by top-level argument name:

    "tools": {"web.fetch": {"secret_arguments": ["authorization"]}}

The agent runner conceals them before it publishes a tool call's request, so the value never
reaches the commands stream, the gate's input, a decision or the audit tables: each becomes
`hmac-sha256:<hex>`, an HMAC-SHA256 of the value's canonical JSON under a key only runners hold
(a plain hash of a short secret could be guessed back by trying candidates). The same value gives
the same text, so a decision stays bound to it, and whoever holds the key can check which value
was used. The tool itself runs on the clear value, which stays in the runner's memory.

This module reads the policy pack's data file only; it needs no Rego engine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

CONCEALED_PREFIX = "hmac-sha256:"
POLICY_DATA_FILE = "data.json"


def shipped_policy_dir() -> Path:
    """The policy pack that ships with the gate: package data in an install, a link to the
    repository's `policies/` in a source checkout."""
    return Path(str(resources.files("warden.policy_gate").joinpath("policies")))


def secret_argument_names(policy_dir: Path) -> dict[str, frozenset[str]]:
    """Per tool, the names of the arguments its policy data marks secret (tools without any left out)."""
    path = policy_dir / POLICY_DATA_FILE
    if not path.exists():
        return {}  # a pack without data marks nothing
    try:
        return secret_argument_names_of(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def secret_argument_names_of(data: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """`secret_argument_names` of a data document already read."""
    tools = data.get("warden", {}).get("tools", {})
    names: dict[str, frozenset[str]] = {}
    for tool, settings in tools.items():
        marked = settings.get("secret_arguments", []) if isinstance(settings, dict) else []
        if not isinstance(marked, list) or not all(isinstance(name, str) for name in marked):
            raise ValueError(f"tools.{tool}.secret_arguments must be a list of names")
        if marked:
            names[tool] = frozenset(marked)
    return names


def is_concealed(value: Any) -> bool:
    """Whether a secret argument's value is in the concealed form (the runner's keyed hash)."""
    return isinstance(value, str) and value.startswith(CONCEALED_PREFIX) and len(value) == len(CONCEALED_PREFIX) + 64


class SecretArguments:
    """Conceals the secret arguments of tool calls (see the module's docstring)."""

    def __init__(self, names_by_tool: Mapping[str, frozenset[str]], key: bytes) -> None:
        self.names_by_tool = dict(names_by_tool)
        self._key = hmac.new(key, b"warden: secret tool arguments", hashlib.sha256).digest()

    @classmethod
    def from_policy_dir(cls, policy_dir: Path, key: bytes) -> SecretArguments:
        return cls(secret_argument_names(policy_dir), key)

    def conceal(self, tool: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """`arguments` as they may be recorded: each secret one replaced by its keyed hash."""
        secret = self.names_by_tool.get(tool, frozenset())
        return {name: self.digest(value) if name in secret else value for name, value in arguments.items()}

    def digest(self, value: Any) -> str:
        canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return CONCEALED_PREFIX + hmac.new(self._key, canonical.encode(), hashlib.sha256).hexdigest()
