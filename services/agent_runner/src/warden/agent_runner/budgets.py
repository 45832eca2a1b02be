"""Budgets that hold under concurrency: each model call and tool call reserves its estimate before it
starts and settles what it used after, in a ledger no two runners can overdraw.

The ledger is a JetStream key-value bucket with one key per budget (`tenant.<tenant>`,
`agent.<tenant>.<agent>`): what was spent, and what each call in flight holds. A reservation is a
compare-and-set on the key's revision, so of two runners that read the same balance only one
writes; the other reads again and decides on the new balance. No single writer is needed, and
nothing is held in memory: a runner that dies holding a reservation leaves it on the key, and
the runner that takes the run over settles it (holds are keyed by call id, so settling twice, or
reserving a call again, changes nothing).

A run's own budget is checked the same way against its recorded usage (one runner executes a
run at a time, so it needs no ledger).
"""

import asyncio
import collections
import functools
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from warden.bus import retry_transient
from warden.errors import PermanentError

NANOS_PER_USD = 1_000_000_000
# Compare-and-set attempts before a reservation gives up (each one lost means another call won).
MAX_CAS_ATTEMPTS = 200
# The output a model call without a cap is assumed to use when its estimate is reserved.
DEFAULT_OUTPUT_ESTIMATE = 4096


@dataclass(frozen=True)
class Amount:
    """What a call uses, or a budget allows: tokens, money (billionths of a US dollar) and tool calls."""

    tokens: int = 0
    cost_nanousd: int = 0
    tool_calls: int = 0

    def __add__(self, other: "Amount") -> "Amount":
        return Amount(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, value: Any) -> "Amount":
        value = value if isinstance(value, dict) else {}
        return cls(**{f.name: int(value.get(f.name, 0)) for f in fields(cls)})


@dataclass(frozen=True)
class Limits:
    """A budget: the most of each dimension it allows (None: no limit on it)."""

    tokens: int | None = None
    cost_nanousd: int | None = None
    tool_calls: int | None = None

    @classmethod
    def from_policy(cls, value: Any) -> "Limits":
        """From the policy data's form: {"tokens": n, "cost_usd": x, "tool_calls": n}."""
        value = value if isinstance(value, dict) else {}
        cost = value.get("cost_usd")
        return cls(
            tokens=_count(value.get("tokens")),
            cost_nanousd=round(cost * NANOS_PER_USD) if _is_number(cost) else None,
            tool_calls=_count(value.get("tool_calls")),
        )

    @property
    def unlimited(self) -> bool:
        return self.tokens is None and self.cost_nanousd is None and self.tool_calls is None

    def overdrawn(self, after: Amount) -> str | None:
        """Which dimension `after` would take over this budget (None: none)."""
        if self.tokens is not None and after.tokens > self.tokens:
            return f"{after.tokens} tokens of {self.tokens}"
        if self.cost_nanousd is not None and after.cost_nanousd > self.cost_nanousd:
            return f"{after.cost_nanousd / NANOS_PER_USD:.6f} USD of {self.cost_nanousd / NANOS_PER_USD:.6f}"
        if self.tool_calls is not None and after.tool_calls > self.tool_calls:
            return f"{after.tool_calls} tool calls of {self.tool_calls}"
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> int | None:
    return int(value) if _is_number(value) else None


@dataclass(frozen=True)
class Budget:
    """One budget in the ledger: its key and what it allows."""

    key: str
    name: str  # how a refusal names it: "tenant acme's", "agent assistant's (tenant acme)"
    limits: Limits


@dataclass(frozen=True)
class Budgets:
    """The budgets the policy data declares (`data.warden.budgets`) and what each tool call costs."""

    tenants: Mapping[str, Limits] = field(default_factory=dict)
    agents: Mapping[str, Limits] = field(default_factory=dict)  # per agent, within each tenant
    runs: Mapping[str, Limits] = field(default_factory=dict)  # per run of an agent ("*": any agent)
    tool_costs: Mapping[str, int] = field(default_factory=dict)  # nanousd per call

    @classmethod
    def from_policy_data(cls, warden: Mapping[str, Any]) -> "Budgets":
        declared = warden.get("budgets") if isinstance(warden.get("budgets"), dict) else {}
        assert isinstance(declared, dict)

        def section(name: str) -> dict[str, Limits]:
            entries = declared.get(name)
            return {key: Limits.from_policy(value) for key, value in (entries or {}).items()}

        tools = warden.get("tools") if isinstance(warden.get("tools"), dict) else {}
        assert isinstance(tools, dict)
        costs = {
            name: round(spec["cost_usd"] * NANOS_PER_USD)
            for name, spec in tools.items()
            if isinstance(spec, dict) and _is_number(spec.get("cost_usd"))
        }
        return cls(section("tenants"), section("agents"), section("runs"), costs)

    def tool_call(self, tool: str) -> Amount:
        """What one call of `tool` is charged: one tool call and its declared cost."""
        return Amount(tool_calls=1, cost_nanousd=self.tool_costs.get(tool, 0))

    def tenant(self, tenant: str) -> Budget | None:
        """The tenant's own budget, if it has one."""
        return next((budget for budget in self.shared(tenant, "") if budget.key.startswith("tenant.")), None)

    def shared(self, tenant: str, agent: str) -> list[Budget]:
        """The budgets a call of this tenant's run of `agent` draws on, besides the run's own."""
        found = []
        if (limits := self.tenants.get(tenant)) and not limits.unlimited:
            found.append(Budget(f"tenant.{tenant}", f"tenant {tenant}'s budget", limits))
        if (limits := self.agents.get(agent)) and not limits.unlimited:
            found.append(Budget(f"agent.{tenant}.{agent}", f"agent {agent}'s budget in tenant {tenant}", limits))
        return found

    def run(self, agent: str) -> Limits | None:
        limits = self.runs.get(agent) or self.runs.get("*")
        return limits if limits and not limits.unlimited else None


@dataclass
class RunSpend:
    """What one run has used so far, held against its own budget (one runner executes a run at a time)."""

    amount: Amount = field(default_factory=Amount)


def model_call_estimate(prices: Any, model: str, messages: Any, max_output_tokens: int | None) -> Amount:
    """What a model call may use, reserved before it is made: its input at about four characters a
    token (a model's tokenizer is not at hand; the settlement uses the reported count), and its
    whole output cap (or DEFAULT_OUTPUT_ESTIMATE tokens without one)."""
    input_tokens = len(json.dumps(messages, ensure_ascii=False)) // 4 + 1
    output_tokens = max_output_tokens or DEFAULT_OUTPUT_ESTIMATE
    cost = prices.cost_usd(model, input_tokens, output_tokens)
    return Amount(tokens=input_tokens + output_tokens, cost_nanousd=round(cost * NANOS_PER_USD))


class BudgetExceeded(PermanentError):
    """A call would take a budget over its limit; the message names the budget and by how much."""


@dataclass
class Balance:
    """One budget's value in the ledger: spent, and held by each call in flight."""

    spent: Amount = field(default_factory=Amount)
    held: dict[str, Amount] = field(default_factory=dict)

    def committed(self) -> Amount:
        total = self.spent
        for amount in self.held.values():
            total = total + amount
        return total

    def to_bytes(self) -> bytes:
        document = {
            "spent": self.spent.as_json(),
            "held": {call: amount.as_json() for call, amount in self.held.items()},
        }
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "Balance":
        document = json.loads(data or b"{}")
        held = document.get("held") or {}
        return cls(Amount.from_json(document.get("spent")), {call: Amount.from_json(v) for call, v in held.items()})


class Ledger:
    """The budgets' balances in a JetStream key-value bucket, changed only by compare-and-set."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self.js = js
        self.bucket = bucket
        self._kv: KeyValue | None = None
        # The calls of one process change a balance one at a time: racing each other, most of their
        # writes would lose (bench/budgets.py: 16 lost races per call with 32 callers, a third of
        # the throughput). Compare-and-set still orders the writes of separate processes.
        self._turns: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await retry_transient(lambda: self.js.key_value(self.bucket), what="the budget ledger")
        return self._kv

    async def balance(self, key: str) -> tuple[Balance, int | None]:
        """The balance under `key` and its revision (None: the key was never written)."""
        kv = await self.kv()
        try:
            entry = await retry_transient(lambda: kv.get(key), what="a budget's balance")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return Balance(), None
        return Balance.from_bytes(entry.value), entry.revision

    async def _change(self, key: str, change: "Any") -> Any:
        """Apply `change(balance) -> (new balance or None to leave it, result)` by compare-and-set."""
        kv = await self.kv()
        async with self._turns[key]:
            return await self._compare_and_set(kv, key, change)

    async def _compare_and_set(self, kv: KeyValue, key: str, change: "Any") -> Any:
        for attempt in range(MAX_CAS_ATTEMPTS):
            balance, revision = await self.balance(key)
            changed, result = change(balance)
            if changed is None:
                return result
            try:
                await retry_transient(
                    functools.partial(_write, kv, key, changed.to_bytes(), revision), what="a budget's balance"
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                # Another call changed the balance since it was read: read it again. A little
                # jitter keeps a crowd of runners from colliding in lockstep.
                await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))
                continue
            return result
        raise TimeoutError(f"the budget {key} kept changing under {MAX_CAS_ATTEMPTS} attempts to update it")

    async def reserve(self, budget: Budget, call_id: str, estimate: Amount) -> str | None:
        """Hold `estimate` for `call_id` if the budget allows it (None), else say why not (nothing held).

        Holding again for a call that already holds is a no-op (a run taken over asks again)."""

        def change(balance: Balance) -> tuple[Balance | None, str | None]:
            if call_id in balance.held:
                return None, None
            if (over := budget.limits.overdrawn(balance.committed() + estimate)) is not None:
                return None, f"{budget.name} would reach {over}"
            balance.held[call_id] = estimate
            return balance, None

        refusal: str | None = await self._change(budget.key, change)
        return refusal

    async def settle(self, budget: Budget, call_id: str, used: Amount) -> None:
        """Replace `call_id`'s hold by what it used; a no-op when it holds nothing (settled already)."""

        def change(balance: Balance) -> tuple[Balance | None, None]:
            if balance.held.pop(call_id, None) is None:
                return None, None
            balance.spent = balance.spent + used
            return balance, None

        await self._change(budget.key, change)


async def _write(kv: KeyValue, key: str, value: bytes, revision: int | None) -> int:
    """Write a balance only over the revision it was computed from (or only if there is none yet)."""
    if revision is None:
        return await kv.create(key, value)
    return await kv.update(key, value, last=revision)
