"""Who may do what on the bus: the NATS permissions of every Warden identity, for one installation.

The server enforces these (see `docs/security.md`); nothing here is checked by Warden's own code.
Each identity may publish and subscribe only its own subjects and call only the JetStream API
requests its work needs, so a compromised or buggy service cannot do another's job:

- only the policy gate publishes decisions, rejections and the policy bundles it puts in force;
- only the agent runner publishes a run's progress and requests tool calls;
- only the scheduler hands work to runners;
- only the provisioner creates or changes streams; nobody, the provisioner included, may delete
  or purge an audited stream or delete its messages (the streams deny both as well);
- only the audit projector reads the server's advisories on messages consumers gave up on, and
  no identity can forge one (none may publish on `$JS.EVENT.>`);
- only the audit projector signs and appends the checkpoints of the audit chains; no identity may
  delete or purge them (their stream denies both as well);
- a tenant's client publishes commands for its tenant and reads that tenant's events only.

Every identity receives replies on an inbox of its own (`inbox_prefix`), never on the shared
`_INBOX.>`, where any client could read the answers meant for another.
"""

from dataclasses import dataclass
from enum import StrEnum

from warden.messages import (
    ApprovalAnswered,
    ApprovalRequested,
    CommandRejected,
    DecisionMade,
    DecisionRefused,
    DecisionShadowed,
    HaltLiftRequested,
    HaltRequested,
    MessageDeadLettered,
    ModelCallRequested,
    Payload,
    PolicyActivated,
    PolicyChanged,
    PolicyChangeRequested,
    RunCancelled,
    RunCancelRequested,
    RunDispatched,
    RunFailed,
    RunPaused,
    RunQueued,
    RunResumed,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StepCompleted,
    StreamGapDetected,
    ToolCallCompleted,
    ToolCallRequested,
)
from warden.streams import StreamNames
from warden.subjects import Subjects

JS_API = "$JS.API"


class Role(StrEnum):
    """What an identity is for; its name is also the file its key is kept in (`<role>.nk`)."""

    PROVISIONER = "provisioner"
    POLICY_GATE = "policy-gate"
    SCHEDULER = "scheduler"
    AGENT_RUNNER = "agent-runner"
    AUDIT_PROJECTOR = "audit-projector"
    # Reads every tenant's events and may submit for any tenant: the stack's own CLI on its host.
    OPERATOR = "operator"
    TENANT = "tenant"


# The identities one installation runs with (tenants' clients are issued on demand).
INSTALLATION_ROLES: tuple[Role, ...] = (
    Role.PROVISIONER,
    Role.POLICY_GATE,
    Role.SCHEDULER,
    Role.AGENT_RUNNER,
    Role.AUDIT_PROJECTOR,
    Role.OPERATOR,
)

# Which messages each service writes: the one place that says it (the server enforces it).
PUBLISHES: dict[Role, tuple[type[Payload], ...]] = {
    Role.POLICY_GATE: (DecisionMade, CommandRejected, PolicyActivated, PolicyChanged, DecisionShadowed),
    # The scheduler ends a cancelled run that never started; the runner one under way.
    Role.SCHEDULER: (RunQueued, RunDispatched, RunResumed, RunCancelled),
    Role.AGENT_RUNNER: (
        RunStarted,
        StepCompleted,
        ToolCallRequested,
        ModelCallRequested,
        ToolCallCompleted,
        RunSucceeded,
        RunFailed,
        DecisionRefused,
        ApprovalRequested,
        RunPaused,
        RunCancelled,
        # An invalid work item leaves the work queue once terminated: the runner records it first.
        MessageDeadLettered,
    ),
    Role.AUDIT_PROJECTOR: (StreamGapDetected, MessageDeadLettered),
    # Only the operator may send a policy change; the policy decides whether its actor may make it.
    Role.OPERATOR: (
        RunSubmitted,
        ApprovalAnswered,
        RunCancelRequested,
        HaltRequested,
        HaltLiftRequested,
        PolicyChangeRequested,
    ),
    Role.TENANT: (RunSubmitted, ApprovalAnswered, RunCancelRequested, HaltRequested, HaltLiftRequested),
}

# Consumer names the services' durable consumers use (kept here so the grants below name them).
GATE_CONSUMER = "policy_gate"
RUNNER_CONSUMER = "agent_runner"
PROJECTOR_CONSUMER = "audit_projector"
DURABLE_OWNERS: dict[str, Role] = {
    GATE_CONSUMER: Role.POLICY_GATE,
    RUNNER_CONSUMER: Role.AGENT_RUNNER,
    PROJECTOR_CONSUMER: Role.AUDIT_PROJECTOR,
}


@dataclass(frozen=True)
class Permissions:
    """Subjects an identity may publish to and subscribe to; everything else the server refuses."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # Refused even where an allowed pattern would match (NATS applies deny after allow).
    deny_publish: tuple[str, ...] = ()

    def as_nats(self) -> dict[str, dict[str, list[str]]]:
        """The `permissions` block of a user in nats-server's configuration."""
        publish: dict[str, list[str]] = {"allow": list(self.publish)}
        if self.deny_publish:
            publish["deny"] = list(self.deny_publish)
        return {"publish": publish, "subscribe": {"allow": list(self.subscribe)}}


def inbox_prefix(public_key: str) -> str:
    """Where an identity receives replies: a prefix no other identity may subscribe to."""
    return f"_INBOX_{public_key}"


def _publishes(subjects: Subjects, role: Role, tenant: str = "*", actor: str = "*") -> list[str]:
    allowed = []
    for payload in PUBLISHES.get(role, ()):
        if payload.KIND == "command":
            allowed.append(f"{subjects.prefix}.cmd.{tenant}.{actor}.{payload.TYPE}")
        else:
            allowed.append(f"{subjects.prefix}.evt.{tenant}.{payload.ENTITY}.*.{payload.TYPE}")
    return allowed


def _durable(stream: str, consumer: str) -> list[str]:
    """Everything a service needs to run one durable consumer of its own: create (in every form
    nats-py uses), look up, pull from, and acknowledge. Never delete: see each service."""
    return [
        f"{JS_API}.CONSUMER.CREATE.{stream}.{consumer}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"{JS_API}.CONSUMER.INFO.{stream}.{consumer}",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def _reads_in_order(stream: str) -> list[str]:
    """Ordered consumers (ephemeral, flow-controlled) over any part of a stream: nats-py's (unnamed)
    and warden.reader's (named, the filter in the request's subject)."""
    return [f"{JS_API}.CONSUMER.CREATE.{stream}", f"{JS_API}.CONSUMER.CREATE.{stream}.*.>", f"$JS.FC.{stream}.>"]


def _direct_get(stream: str) -> list[str]:
    """Read single messages (by sequence, or the last on a subject) from a stream allowing direct gets."""
    return [f"{JS_API}.DIRECT.GET.{stream}", f"{JS_API}.DIRECT.GET.{stream}.>"]


# The JetStream API requests that would erase audit records: refused to every identity Warden issues.
_NEVER_DESTROY = (f"{JS_API}.STREAM.DELETE.*", f"{JS_API}.STREAM.PURGE.*", f"{JS_API}.STREAM.MSG.DELETE.*")


def _hands_off_others_consumers(role: Role) -> tuple[str, ...]:
    """Another service's durable consumer may not be re-created (under another filter), deleted,
    pulled from or looked at: wherever a grant names consumers by wildcard, this holds."""
    denied = []
    for consumer, owner in DURABLE_OWNERS.items():
        if owner is not role:
            denied += [
                f"{JS_API}.CONSUMER.CREATE.*.{consumer}",
                f"{JS_API}.CONSUMER.CREATE.*.{consumer}.>",
                f"{JS_API}.CONSUMER.DURABLE.CREATE.*.{consumer}",
                f"{JS_API}.CONSUMER.DELETE.*.{consumer}",
                f"{JS_API}.CONSUMER.MSG.NEXT.*.{consumer}",
                f"{JS_API}.CONSUMER.INFO.*.{consumer}",
            ]
    return tuple(denied)


def service_permissions(role: Role, subjects: Subjects, public_key: str) -> Permissions:
    """The permissions of one of an installation's own identities (not a tenant's)."""
    streams = StreamNames.for_prefix(subjects.prefix)
    inbox = f"{inbox_prefix(public_key)}.>"
    kv_stream, ledger_stream = f"KV_{streams.scheduler}", f"KV_{streams.ledger}"
    match role:
        case Role.PROVISIONER:
            publish = [
                f"{JS_API}.INFO",
                *(
                    f"{JS_API}.STREAM.{verb}.{name}"
                    for verb in ("CREATE", "UPDATE", "INFO")
                    for name in (*streams.installation, kv_stream, ledger_stream, streams.access)
                ),
            ]
        case Role.POLICY_GATE:
            publish = [
                *_publishes(subjects, role),
                # A decision is filed under the entity of its request: cancels and halts have their own.
                subjects.decisions_on(RunCancelRequested),
                subjects.decisions_on(HaltRequested),
                subjects.decisions_on(PolicyChangeRequested),
                *_durable(streams.commands, GATE_CONSUMER),
                # The policy lifecycle (policy.changed), followed from the stream's start.
                *_reads_in_order(streams.events),
                # The approval request an answer names, read by its sequence.
                *_direct_get(streams.events),
            ]
        case Role.SCHEDULER:
            publish = [
                *_publishes(subjects, role),
                f"{subjects.prefix}.work.*",
                *_reads_in_order(streams.events),
                # How far its fold's consumer has got (the consumer's name is random), and
                # whether the stream is still there.
                f"{JS_API}.CONSUMER.INFO.{streams.events}.*",
                f"{JS_API}.STREAM.INFO.{streams.events}",
                *_direct_get(streams.commands),
                *_direct_get(streams.events),
                # Its key-value bucket: where its fold starts.
                f"{JS_API}.STREAM.INFO.{kv_stream}",
                f"{JS_API}.STREAM.MSG.GET.{kv_stream}",
                f"$KV.{streams.scheduler}.>",
            ]
        case Role.AGENT_RUNNER:
            publish = [
                *_publishes(subjects, role),
                # A run submitted before actors were bound to subjects (or by an actor no subject
                # token can name) has its tool calls asked for on the form without an actor.
                f"{subjects.prefix}.cmd.*.{ToolCallRequested.TYPE}",
                f"{subjects.prefix}.cmd.*.{ModelCallRequested.TYPE}",
                *_durable(streams.work, RUNNER_CONSUMER),
                *_reads_in_order(streams.events),
                # Whether its view of the cancels and halts in force has caught up (a random name).
                f"{JS_API}.CONSUMER.INFO.{streams.events}.*",
                f"{JS_API}.STREAM.INFO.{streams.events}",
                *_direct_get(streams.commands),
                *_direct_get(streams.events),
                # The budget ledger: balances read, and changed by compare-and-set.
                f"{JS_API}.STREAM.INFO.{ledger_stream}",
                f"{JS_API}.STREAM.MSG.GET.{ledger_stream}",
                f"$KV.{streams.ledger}.>",
            ]
        case Role.AUDIT_PROJECTOR:
            publish = [
                *_publishes(subjects, role),
                *(grant for stream in streams.audited for grant in _durable(stream, PROJECTOR_CONSUMER)),
                *(f"{JS_API}.STREAM.INFO.{stream}" for stream in streams.audited),
                *(f"{JS_API}.STREAM.MSG.GET.{stream}" for stream in streams.consumed),
                # Its signed checkpoints of the audit chains: appended (each on top of its chain's
                # last, which it reads back on start), and read by `warden audit verify` through
                # consumers of its own, as a replay reads the audited streams (below).
                f"{subjects.prefix}.chk.*.*",
                f"{JS_API}.STREAM.MSG.GET.{streams.checkpoints}",
                f"{JS_API}.STREAM.INFO.{streams.checkpoints}",
                # The server's advisories on messages consumers gave up on, each recorded as a dead
                # letter with the message's bytes (read from its stream above, while it is there).
                *_durable(streams.advisories, PROJECTOR_CONSUMER),
                # A replay reads each stream through consumers of its own (named replay_<random>),
                # and it re-creates its durable consumers when it re-projects from the start.
                *(
                    f"{JS_API}.CONSUMER.{verb}.{stream}.{name}"
                    for verb, name in (("CREATE", "*.>"), ("MSG.NEXT", "*"), ("DELETE", "*"))
                    for stream in (*streams.audited, streams.checkpoints)
                ),
            ]
        case Role.OPERATOR:
            # Reads every tenant, and only in ways the server reports on the access stream (a
            # consumer's creation, a stream lookup): no direct or message get, no core
            # subscription to the tenants' subjects. `warden audit access` lists what it read.
            publish = [
                *_publishes(subjects, role),
                *(
                    grant
                    for stream in (*streams.audited, streams.access, streams.checkpoints)
                    for grant in _reads_in_order(stream)
                ),
                *(
                    f"{JS_API}.STREAM.INFO.{stream}"
                    for stream in (*streams.audited, streams.access, streams.checkpoints)
                ),
            ]
        case Role.TENANT:
            raise ValueError("a tenant's permissions depend on its tenant: use tenant_permissions")
    return Permissions(
        subscribe=(inbox,),
        publish=tuple(publish),
        deny_publish=(*_NEVER_DESTROY, *_hands_off_others_consumers(role)),
    )


def tenant_permissions(tenant: str, actor: str, subjects: Subjects, public_key: str) -> Permissions:
    """A tenant's client: submits for its tenant as its actor, reads its tenant's commands and events,
    nothing else.

    Reading goes through consumers whose filter is named in the request's subject
    (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, see `warden.reader`): the server refuses
    one whose filter is another tenant's. Every other way into a stream (stream info, message
    get, an unnamed consumer, pulling from a consumer) is not granted, and the services' own
    consumers cannot be re-created under a tenant's filter (denied by name).
    """
    streams = StreamNames.for_prefix(subjects.prefix)
    inbox = f"{inbox_prefix(public_key)}.>"
    own_events = subjects.tenant_events(tenant)
    own_commands = f"{subjects.prefix}.cmd.{tenant}.>"
    return Permissions(
        publish=(
            *_publishes(subjects, Role.TENANT, tenant, actor),
            f"{JS_API}.CONSUMER.CREATE.{streams.events}.*.{own_events}",
            f"{JS_API}.CONSUMER.CREATE.{streams.commands}.*.{own_commands}",
            *(f"$JS.FC.{stream}.>" for stream in streams.audited),
        ),
        subscribe=(inbox, own_events),
        deny_publish=(*_NEVER_DESTROY, *_hands_off_others_consumers(Role.TENANT)),
    )
