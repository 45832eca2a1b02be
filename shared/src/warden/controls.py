"""Cancels and halts in force: a pure fold of the gate's signed decisions on them, and its live feed.

A halt or cancel is in force once the gate's allow on it is stored. The scheduler and every agent
runner fold the decisions on `run.cancel_requested`, `halt.requested` and `halt.lift_requested`
(filed under their own entities, `cancel` and `halt`, so one ordered consumer from sequence 1
reads them and nothing else) and ask the view before each step and call: a dict look-up, no round
trip. The view is rebuilt from the stream on every start, so halts survive restarts.
"""

import asyncio
import contextlib
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from warden.consumers import ordered_subscription
from warden.errors import InvalidMessage
from warden.messages import (
    DecisionMade,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    RunCancelRequested,
    parse_envelope,
)
from warden.subjects import Subjects

if TYPE_CHECKING:  # a client-only install lists halts without the signing library
    from warden.signing import DecisionVerifier

# The scope token of a halt of a whole tenant: `_` cannot begin an agent's name, so no agent's
# token can be this.
TENANT_SCOPE = "_tenant"
_SAFE_AGENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,100}$")
# A view that has not caught up in this long is opened again (a consumer lost while it read).
CATCH_UP_SECONDS = 30.0
CONTROL_TYPES = frozenset({RunCancelRequested.TYPE, HaltRequested.TYPE, HaltLiftRequested.TYPE})


def scope_token(agent: str | None) -> str:
    """The entity id of a halt's scope: the tenant's, or one agent's (its name when that is a
    subject token, else a hash of it, since agent names may hold `.` and `:`)."""
    if agent is None:
        return TENANT_SCOPE
    if _SAFE_AGENT.match(agent):
        return f"agent-{agent}"
    return "agent-h" + hashlib.sha256(agent.encode()).hexdigest()[:40]


def control_hash(request_type: str, entity_id: str) -> str:
    """What a decision on a control binds in its signed `arguments_hash`: the kind of control and
    its scope. The request type itself is not in the signed binding, so without this a signed allow
    on a run's submission, copied to the run's cancel subject, would read as a cancel."""
    from warden.signing import arguments_hash  # noqa: PLC0415  (a client-only install has no signing library)

    return arguments_hash({"warden-control": request_type, "scope": entity_id})


@dataclass(frozen=True)
class Control:
    """One cancel or halt in force: the decision that put it there, and what to say of it."""

    kind: Literal["cancel", "halt"]
    decision_id: str
    reason: str
    decided_at: datetime
    stream_seq: int


@dataclass
class ControlView:
    """Cancels and halts in force, folded from the gate's decisions in stream order."""

    cancels: dict[tuple[str, str], Control] = field(default_factory=dict)  # (tenant, run id)
    halts: dict[tuple[str, str], Control] = field(default_factory=dict)  # (tenant, scope token)
    refused: int = 0  # decisions not taken: unsigned, untrusted, altered, or not bound to a control

    def apply(self, envelope: Envelope[Any], seq: int, verifier: "DecisionVerifier | None") -> bool:
        """Fold one decision; False when it is not a genuine allow on a control (and changes nothing).

        `verifier` None takes the record as it is: only for listing it, never for acting on it.
        """
        verdict = envelope.data
        if not isinstance(verdict, DecisionMade) or verdict.request_type not in CONTROL_TYPES:
            return False
        tenant, entity_id = envelope.tenant, envelope.entity_id
        if verifier is not None and (
            verifier.refusal(verdict, tenant, entity_id) is not None
            or verdict.arguments_hash != control_hash(verdict.request_type, entity_id)
        ):
            self.refused += 1
            return False
        if verdict.effect != "allow":
            return False
        reason = verdict.reasons[0] if verdict.reasons else verdict.request_type
        key = (tenant, entity_id)
        if verdict.request_type == RunCancelRequested.TYPE:
            self.cancels.setdefault(key, Control("cancel", verdict.decision_id, reason, envelope.time, seq))
        elif verdict.request_type == HaltRequested.TYPE:
            self.halts[key] = Control("halt", verdict.decision_id, reason, envelope.time, seq)
        else:
            self.halts.pop(key, None)
        return True

    def halt_over(self, tenant: str, agent: str) -> Control | None:
        """The halt a run of this agent is under, if any (the tenant's first)."""
        return self.halts.get((tenant, TENANT_SCOPE)) or self.halts.get((tenant, scope_token(agent)))

    def stop(self, tenant: str, run_id: str, agent: str) -> Control | None:
        """Why a run must not go on (its cancel, else its scope's halt), or None: it may."""
        return self.cancels.get((tenant, run_id)) or self.halt_over(tenant, agent)


class ControlFeed:
    """The live view: one ordered consumer from sequence 1 over the decisions on cancels and halts."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        stream: str,
        verifier: "DecisionVerifier",
    ) -> None:
        self.js = js
        self.subjects = subjects
        self.stream = stream
        self.verifier = verifier
        self.view = ControlView()
        self.caught_up = asyncio.Event()
        self.seen = 0  # messages folded since the consumer was made
        self.stored: int | None = None  # what it had to deliver when it was made (None: not asked yet)
        self.subscription: Any = None

    async def open(self) -> None:
        """Subscribe and return once every decision stored before now is folded (TimeoutError: not
        within CATCH_UP_SECONDS, which a caller's retry of passing bus failures takes as one)."""
        await self.close()
        self.view, self.caught_up, self.seen, self.stored = ControlView(), asyncio.Event(), 0, None
        self.subscription = await ordered_subscription(
            self.js,
            [self.subjects.decisions_on(RunCancelRequested), self.subjects.decisions_on(HaltRequested)],
            self.stream,
            self._on_message,
            deliver_policy=DeliverPolicy.ALL,
        )
        # Caught up once the callback has folded as many messages as the consumer had delivered or
        # still had to deliver when asked: delivered is not yet folded (callbacks queue in nats-py).
        info = await self.subscription.consumer_info()
        self.stored = info.delivered.consumer_seq + info.num_pending
        self._check_caught_up()
        await asyncio.wait_for(self.caught_up.wait(), CATCH_UP_SECONDS)

    def _check_caught_up(self) -> None:
        if self.stored is not None and self.seen >= self.stored:
            self.caught_up.set()

    async def close(self) -> None:
        if self.subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.subscription.unsubscribe()

    async def _on_message(self, message: Msg) -> None:
        try:
            envelope = parse_envelope(message.data, type_hint=DecisionMade.TYPE)
            self.subjects.check_envelope_subject(envelope, message.subject)
        except InvalidMessage:
            pass
        else:
            self.view.apply(envelope, message.metadata.sequence.stream, self.verifier)
        self.seen += 1
        self._check_caught_up()
