"""The subject catalogue: the one place that says which NATS subject carries which message.

Subjects carry the tenant and the entity so that NATS permissions and wildcards do real work:

    <prefix>.cmd.<tenant>.<actor>.<type>               commands (type has two tokens: run.submitted)
    <prefix>.evt.<tenant>.<entity>.<entity_id>.<type>  events
    <prefix>.work.<tenant>                             runs handed to agent runners
    <prefix>.chk.<tenant>.<stream>                     signed checkpoints of the audit chains

The prefix (default `warden`) lets several installations, or every test, share one NATS server
without sharing state. The README table is generated from `CHANNELS`, and the services declare
their FastStream subscribers and publishers (`warden.channels`) on its addresses.
"""

import re
from dataclasses import dataclass
from typing import Any

from warden.errors import InvalidMessage, RejectionCode
from warden.messages import MESSAGE_TYPES, DecisionMade, Envelope, Payload

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A message whose subject names no valid tenant (characters NATS allows and Warden does not, or
# a token too long to index) is filed under this tenant rather than lost.
UNATTRIBUTED_TENANT = "_unattributed"
# Events about the installation itself (a gap in a stream, a dead letter) rather than any tenant's work.
SYSTEM_TENANT = "_warden"


@dataclass(frozen=True)
class Channel:
    """A family of subjects: its address pattern, what it carries, and who writes and reads it."""

    name: str
    pattern: str
    message_types: tuple[str, ...]
    published_by: str
    consumed_by: str
    description: str


def _ensure_token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid NATS subject token")
    return value


class Subjects:
    """Builds and parses every Warden subject under one prefix."""

    def __init__(self, prefix: str = "warden") -> None:
        self.prefix = _ensure_token(prefix, "subject prefix")

    # Commands
    def command(self, tenant: str, type_name: str, actor: str | None = None) -> str:
        """Where `actor` of `tenant` sends a command: the server lets only that actor's credential
        publish there, so the subject proves who sent it. Without an actor, the form written before
        actors were bound to subjects, which only an identity allowed everything can still write."""
        tenant = _ensure_token(tenant, "tenant")
        if actor is None:
            return f"{self.prefix}.cmd.{tenant}.{type_name}"
        return f"{self.prefix}.cmd.{tenant}.{_ensure_token(actor, 'actor')}.{type_name}"

    @property
    def command_prefix(self) -> str:
        """What every command subject starts with."""
        return f"{self.prefix}.cmd."

    @property
    def all_commands(self) -> str:
        return f"{self.prefix}.cmd.>"

    def parse_command(self, subject: str) -> tuple[str, str]:
        """Split a command subject into (tenant, type); raise ValueError if it is not one."""
        parts = subject.split(".")
        if len(parts) < 4 or parts[0] != self.prefix or parts[1] != "cmd":
            raise ValueError(f"{subject!r} is not a {self.prefix} command subject")
        return parts[2], ".".join(parts[3:])

    # Events
    def event(self, tenant: str, payload: type[Payload] | Payload, entity_id: str) -> str:
        _ensure_token(tenant, "tenant")
        _ensure_token(entity_id, "entity id")
        return f"{self.prefix}.evt.{tenant}.{payload.ENTITY}.{entity_id}.{payload.TYPE}"

    # Checkpoints
    def checkpoint(self, tenant: str, stream: str) -> str:
        """Where the audit projector appends the signed checkpoints of one chain (see warden.audit_chain)."""
        return f"{self.prefix}.chk.{_ensure_token(tenant, 'tenant')}.{_ensure_token(stream, 'stream')}"

    @property
    def all_checkpoints(self) -> str:
        return f"{self.prefix}.chk.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.evt.>"

    def events_of_type(self, payload: type[Payload]) -> str:
        """Every tenant's and entity's events of one type, e.g. all `decision.made`."""
        return f"{self.prefix}.evt.*.{payload.ENTITY}.*.{payload.TYPE}"

    def tenant_events_of_type(self, tenant: str, payload: type[Payload]) -> str:
        """One tenant's events of one type, e.g. its `approval.requested`."""
        return f"{self.prefix}.evt.{_ensure_token(tenant, 'tenant')}.{payload.ENTITY}.*.{payload.TYPE}"

    def tenant_events(self, tenant: str) -> str:
        return f"{self.prefix}.evt.{_ensure_token(tenant, 'tenant')}.>"

    def run_events(self, tenant: str, run_id: str) -> str:
        return f"{self.prefix}.evt.{_ensure_token(tenant, 'tenant')}.run.{_ensure_token(run_id, 'run id')}.>"

    def command_rejections(self, tenant: str, command_id: str) -> str:
        return (
            f"{self.prefix}.evt.{_ensure_token(tenant, 'tenant')}.command.{_ensure_token(command_id, 'command id')}.>"
        )

    def expected_subject(self, envelope: Envelope[Any]) -> str:
        """The one subject this envelope may travel on.

        Built without checking the tokens again: the envelope's model already holds its tenant and
        entity id to the token rules, and this runs once per message the projector reads.
        """
        data = envelope.data
        if data.KIND == "command":
            if _TOKEN.match(envelope.actor):
                return f"{self.prefix}.cmd.{envelope.tenant}.{envelope.actor}.{data.TYPE}"
            return f"{self.prefix}.cmd.{envelope.tenant}.{data.TYPE}"  # no subject can name this actor
        return f"{self.prefix}.evt.{envelope.tenant}.{entity_of_payload(data)}.{envelope.entity_id}.{data.TYPE}"

    def decision_on(self, tenant: str, request: type[Payload], entity_id: str) -> str:
        """Where the gate's decision on one request about `entity_id` is filed (see `entity_of_payload`)."""
        _ensure_token(tenant, "tenant")
        _ensure_token(entity_id, "entity id")
        return f"{self.prefix}.evt.{tenant}.{request.ENTITY}.{entity_id}.{DecisionMade.TYPE}"

    def tenant_decisions_on(self, tenant: str, request: type[Payload]) -> str:
        """One tenant's decisions on one kind of request, e.g. its halts and lifts."""
        return f"{self.prefix}.evt.{_ensure_token(tenant, 'tenant')}.{request.ENTITY}.*.{DecisionMade.TYPE}"

    def decisions_on(self, request: type[Payload]) -> str:
        """Every tenant's decisions on one kind of request, e.g. all decisions on halts."""
        return f"{self.prefix}.evt.*.{request.ENTITY}.*.{DecisionMade.TYPE}"

    def decisions(self, tenant: str | None = None) -> str:
        """Every decision the gate recorded, on any request: one tenant's, or (None) every tenant's."""
        scope = "*" if tenant is None else _ensure_token(tenant, "tenant")
        return f"{self.prefix}.evt.{scope}.*.*.{DecisionMade.TYPE}"

    def check_envelope_subject(self, envelope: Envelope[Any], nats_subject: str) -> None:
        """Refuse an envelope whose tenant, actor or type disagrees with the subject it arrived on.

        NATS permissions are granted per subject, so a tenant allowed only `warden.cmd.acme.>`
        must not be able to smuggle another tenant's command inside the body, and alice's
        credential (allowed `warden.cmd.acme.alice.run.submitted`) must not be able to claim bob
        as the actor (`actor_mismatch`). A command on the form without an actor is accepted as it
        was before actors were bound to subjects: only an identity allowed everything can write it.
        """
        expected = self.expected_subject(envelope)
        if nats_subject == expected:
            return
        data = envelope.data
        if data.KIND == "command":
            if nats_subject == f"{self.prefix}.cmd.{envelope.tenant}.{data.TYPE}":
                return
            head, tail = f"{self.prefix}.cmd.{envelope.tenant}.", f".{data.TYPE}"
            sender = nats_subject[len(head) : -len(tail)]
            if nats_subject.startswith(head) and nats_subject.endswith(tail) and _TOKEN.match(sender):
                raise InvalidMessage(
                    RejectionCode.ACTOR_MISMATCH,
                    f"the command claims actor {envelope.actor!r}, but was sent by {sender!r} (on {nats_subject!r})",
                )
        if nats_subject != expected:
            raise InvalidMessage(
                RejectionCode.SUBJECT_MISMATCH,
                f"a {envelope.type} envelope for tenant {envelope.tenant!r} must arrive on "
                f"{expected!r}, not {nats_subject!r}",
            )

    def tenant_of(self, nats_subject: str) -> str:
        """The tenant a message on this subject is filed under: its tenant token if that is a valid
        tenant id (`<prefix>.<channel>.<tenant>...`), else UNATTRIBUTED_TENANT."""
        parts = nats_subject.split(".", 3)
        tenant = parts[2] if len(parts) > 2 else ""
        return tenant if _TENANT.match(tenant) else UNATTRIBUTED_TENANT

    def entity_of(self, nats_subject: str) -> str:
        """The entity id token of an event subject (`<prefix>.evt.<tenant>.<entity>.<id>.<type>`)."""
        parts = nats_subject.split(".")
        return parts[4] if len(parts) > 4 else ""

    # The policy in force: installation-wide, under the reserved tenant
    def policy_event(self, payload: type[Payload], entity_id: str) -> str:
        """Where an event about the installation's policy is filed (`policy.activated` under its revision's token)."""
        return self.event(SYSTEM_TENANT, payload, entity_id)

    def policy_events_of_type(self, payload: type[Payload]) -> str:
        """Every event of one type about the installation's policy, e.g. every `policy.activated`."""
        return f"{self.prefix}.evt.{SYSTEM_TENANT}.{payload.ENTITY}.*.{payload.TYPE}"

    # Work handed from the scheduler to agent runners
    def work(self, tenant: str) -> str:
        return f"{self.prefix}.work.{_ensure_token(tenant, 'tenant')}"

    @property
    def all_work(self) -> str:
        return f"{self.prefix}.work.>"


def entity_of_payload(data: Payload) -> str:
    """The entity an event is filed under: its type's, except that a decision is filed under the
    entity of the request it answers (a decision on a halt under `halt`), so that a reader can
    follow the decisions on cancels and halts alone, from sequence 1, without those on every call."""
    if isinstance(data, DecisionMade):
        request = MESSAGE_TYPES.get(data.request_type)
        return request.ENTITY if request is not None and request.KIND == "command" else DecisionMade.ENTITY
    return data.ENTITY


def _types_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, model in MESSAGE_TYPES.items() if kind == model.KIND)


CHANNELS: tuple[Channel, ...] = (
    Channel(
        name="commands",
        pattern="{prefix}.cmd.{tenant}.{actor}.{type}",
        message_types=_types_of("command"),
        published_by="clients (run.submitted, approval.answered, run.cancel_requested, halt.requested, "
        "halt.lift_requested), the operator (policy.change_requested, under the tenant _warden), "
        "agent runner (tool_call.requested, model_call.requested)",
        consumed_by="policy gate, audit projector",
        description="Requests that need a decision. Stored before anything acts on them; "
        "the idempotency key travels as the Nats-Msg-Id header.",
    ),
    Channel(
        name="events",
        pattern="{prefix}.evt.{tenant}.{entity}.{entity_id}.{type}",
        message_types=_types_of("event"),
        published_by="policy gate, scheduler, agent runner, "
        "audit projector (stream.gap_detected, message.dead_lettered)",
        consumed_by="audit projector, scheduler, agent runner, policy gate (the policy lifecycle), "
        "clients (tail, approvals)",
        description="Facts: decisions, rejections and every step of a run. "
        "Tail one run with {prefix}.evt.{tenant}.run.{run_id}.>; decisions on cancels and halts are filed "
        "under entities cancel and halt; holes found in a stream, "
        "messages a consumer gave up on, the policy bundles gates put in force "
        "({prefix}.evt._warden.policy.{revision}.policy.activated) and the policy lifecycle "
        "({prefix}.evt._warden.policy.{revision}.policy.changed) are filed under the tenant _warden; "
        "a shadow bundle's disagreements with live decisions under {prefix}.evt.{tenant}.policy.{revision}."
        "decision.shadowed.",
    ),
    Channel(
        name="work",
        pattern="{prefix}.work.{tenant}",
        message_types=("run.dispatched",),
        published_by="scheduler",
        consumed_by="agent runner",
        description="Allowed runs handed to agent runners; a work queue, each run taken once.",
    ),
)
