"""JetStream stream definitions and their provisioning, which one component owns.

Only `provision()` (run by `warden up` or `warden provision`) creates or changes streams. Services
bind to them without declaring them, so no service can silently change a stream's limits.
"""

import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from warden.subjects import Subjects

# The standard library's logging: clients import this module and need no structlog; a service's
# structlog set-up renders these lines as JSON like its own.
log = logging.getLogger(__name__)

# The hard ceiling JetStream enforces per message; the server's max_payload (deploy/nats) matches.
STREAM_MAX_MSG_BYTES = 1024 * 1024


# Every JetStream API request made on the account, as the server itself reports it: its api_audit
# advisory names the identity that asked (its public key), the request's subject and its body. So
# whoever reads an installation's streams through a consumer, a stream lookup included, is on a
# record no identity can forge (no Warden identity may publish on `$JS.EVENT.>`) or erase. One
# stream per account, shared by the installations on it: a subject is captured by one stream only.
# Message gets and direct gets are not reported, so identities that read across tenants are not
# granted them. Kept 30 days.
ACCESS_STREAM = "WARDEN_ACCESS"
ACCESS_SUBJECT = "$JS.EVENT.ADVISORY.API"
ACCESS_RETENTION_SECONDS = 30 * 24 * 3600.0

# What the server says when a consumer gives up on a message: it was delivered as often as the
# consumer allows (`<prefix>.<stream>.<consumer>`), or the consumer terminated it. Advisories are
# core messages, lost when nobody listens, so each installation captures those about its own
# streams in a stream of its own (see `advisory_subjects`). Kept 30 days: the audit projector
# records each as a `message.dead_lettered` event (kept for good) as soon as it can.
MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
TERMINATED_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED"
ADVISORY_RETENTION_SECONDS = 30 * 24 * 3600.0


@dataclass(frozen=True)
class StreamNames:
    """Stream names derived from the subject prefix, so each installation (and test) has its own."""

    commands: str
    events: str
    work: str
    scheduler: str  # a key-value bucket: where the scheduler's fold starts (see services/scheduler)
    ledger: str  # a key-value bucket: the budgets' balances (see warden.agent_runner.budgets)
    advisories: str  # the server's word on messages consumers gave up on (see MAX_DELIVERIES_ADVISORY)
    checkpoints: str  # the audit projector's signed checkpoints of the audit chains (warden.audit_chain)
    access: str = ACCESS_STREAM  # the account's, shared by its installations (see ACCESS_STREAM)

    @classmethod
    def for_prefix(cls, prefix: str) -> "StreamNames":
        stem = prefix.upper().replace("-", "_")
        return cls(
            commands=f"{stem}_COMMANDS",
            events=f"{stem}_EVENTS",
            work=f"{stem}_WORK",
            scheduler=f"{stem}_SCHEDULER",
            ledger=f"{stem}_LEDGER",
            advisories=f"{stem}_ADVISORIES",
            checkpoints=f"{stem}_CHECKPOINTS",
        )

    @property
    def audited(self) -> tuple[str, ...]:
        """The streams the audit trail is made of (work items are copies of audited commands)."""
        return (self.commands, self.events)

    @property
    def consumed(self) -> tuple[str, ...]:
        """The streams the services consume: a message any consumer gives up on is a dead letter."""
        return (self.commands, self.events, self.work)

    @property
    def installation(self) -> tuple[str, ...]:
        """Every stream this installation alone owns (not the key-value bucket, nor the shared access stream)."""
        return (*self.consumed, self.advisories, self.checkpoints)

    def advisory_subjects(self) -> list[str]:
        """The advisories about consumers giving up on this installation's messages, and no other's:
        several installations (every test) may share one NATS account."""
        return [
            f"{advisory}.{stream}.*"
            for advisory in (MAX_DELIVERIES_ADVISORY, TERMINATED_ADVISORY)
            for stream in self.consumed
        ]


def _stream(
    name: str,
    *,
    description: str,
    subjects: list[str],
    retention: RetentionPolicy,
    dedup_s: float,
    replicas: int,
    audited: bool = True,
    max_age_s: float | None = None,
) -> StreamConfig:
    return StreamConfig(
        name=name,
        description=description,
        subjects=subjects,
        retention=retention,
        duplicate_window=dedup_s,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msg_size=STREAM_MAX_MSG_BYTES,
        # A full stream refuses new writes rather than silently dropping old audit records.
        discard=DiscardPolicy.NEW,
        allow_direct=True,
        # The audit trail loses no message, whoever asks: the server refuses to delete or purge.
        # (The work queue deletes each item once a runner acks it, so it cannot deny deletes.)
        deny_delete=audited,
        deny_purge=audited,
        max_age=max_age_s,
    )


def stream_configs(subjects: Subjects, replicas: int = 1) -> list[StreamConfig]:
    names = StreamNames.for_prefix(subjects.prefix)
    return [
        # Client retries within ten minutes are deduplicated by their Nats-Msg-Id.
        _stream(
            names.commands,
            description="Every command as received, valid or not: the audit trail's intake.",
            subjects=[subjects.all_commands],
            retention=RetentionPolicy.LIMITS,
            dedup_s=600.0,
            replicas=replicas,
        ),
        _stream(
            names.events,
            description="Every decision and every step of every run: append-only.",
            subjects=[subjects.all_events],
            retention=RetentionPolicy.LIMITS,
            dedup_s=120.0,
            replicas=replicas,
        ),
        _stream(
            names.work,
            description="Runs waiting for an agent runner; each is removed once a runner acks it.",
            subjects=[subjects.all_work],
            retention=RetentionPolicy.WORK_QUEUE,
            dedup_s=120.0,
            replicas=replicas,
            audited=False,
        ),
        # Retained for a while rather than removed once recorded (a work queue): the server's own
        # word stays beside the events made from it, to check them against.
        _stream(
            names.advisories,
            description="The server's advisories on messages a consumer gave up on: max deliveries, terminated.",
            subjects=names.advisory_subjects(),
            retention=RetentionPolicy.LIMITS,
            dedup_s=120.0,
            replicas=replicas,
            max_age_s=ADVISORY_RETENTION_SECONDS,
        ),
        # Where a database administrator cannot reach: no identity may delete or purge a checkpoint,
        # and each is appended only on top of its chain's previous one (see warden.audit_projector.checkpoints).
        _stream(
            names.checkpoints,
            description="Signed checkpoints of the audit log's hash chains, one subject per tenant and stream.",
            subjects=[subjects.all_checkpoints],
            retention=RetentionPolicy.LIMITS,
            dedup_s=120.0,
            replicas=replicas,
        ),
        _stream(
            names.access,
            description="Every JetStream API request on the account, as the server reports it (api_audit).",
            subjects=[ACCESS_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            dedup_s=120.0,
            replicas=replicas,
            max_age_s=ACCESS_RETENTION_SECONDS,
        ),
    ]


@dataclass(frozen=True)
class Change:
    """One setting of one stream that differs from what is declared."""

    stream: str
    setting: str
    current: Any
    declared: Any
    weakens: bool  # applying it would make the stream less durable

    def __str__(self) -> str:
        return f"{self.stream}: {self.setting} {_shown(self.current)!r} -> {_shown(self.declared)!r}"


def _shown(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


@dataclass
class Provisioned:
    """What provisioning did: streams created, settings changed, and weakening changes it refused."""

    created: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    refused: list[Change] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            *(f"created {stream}" for stream in self.created),
            *(f"updated {change}" for change in self.changed),
            *(f"refused {change} (it would weaken the stream; --force to apply)" for change in self.refused),
        ]


# Settings compared with the live stream, and how each can weaken durability. Limits count as
# unlimited when 0 or negative.
_SETTINGS = ("subjects", "description", "duplicate_window", "max_msg_size", "allow_direct")
_LIMITS = ("max_msgs", "max_bytes", "max_age", "max_msgs_per_subject")


def _unlimited(value: Any) -> bool:
    return value is None or value <= 0


def _weakens(setting: str, current: Any, declared: Any) -> bool:
    if setting == "num_replicas":
        return bool(declared < current)
    if setting == "storage":
        return bool(current == StorageType.FILE and declared != StorageType.FILE)
    if setting == "discard":
        return bool(current == DiscardPolicy.NEW and declared != DiscardPolicy.NEW)
    if setting == "retention":
        return True  # every other retention deletes messages that limits retention keeps
    if setting in _LIMITS:
        return not _unlimited(declared) and (_unlimited(current) or declared < current)
    if setting in ("deny_delete", "deny_purge"):
        return bool(current and not declared)
    return False


def _differences(current: StreamConfig, declared: StreamConfig) -> list[Change]:
    name = declared.name or ""
    settings = (*_SETTINGS, "num_replicas", "storage", "discard", "retention", *_LIMITS, "deny_delete", "deny_purge")
    changes = []
    for setting in settings:
        wanted, live = getattr(declared, setting), getattr(current, setting)
        if wanted is None or wanted == live:
            continue  # not declared here, or already so
        changes.append(Change(name, setting, live, wanted, _weakens(setting, live, wanted)))
    return changes


async def _provision_bucket(js: JetStreamContext, bucket: str, replicas: int, force: bool, result: Provisioned) -> None:
    """Create a key-value bucket (the scheduler's, the budget ledger), or bring its replicas to the
    declared number, by the same never-weaken rule as the streams (a bucket is a stream, `KV_<bucket>`)."""
    stream = f"KV_{bucket}"
    try:
        current = (await js.stream_info(stream)).config
    except NotFoundError:
        # One value per key, rewritten in place (by compare-and-set on its revision, for the ledger):
        # the history worth keeping is in the events stream.
        await js.create_key_value(KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=replicas))
        result.created.append(stream)
        return
    if current.num_replicas == replicas:
        return
    change = Change(
        stream, "num_replicas", current.num_replicas, replicas, _weakens("num_replicas", current.num_replicas, replicas)
    )
    if change.weakens and not force:
        result.refused.append(change)
        return
    await js.update_stream(replace(current, num_replicas=replicas))
    result.changed.append(change)


async def provision(js: JetStreamContext, subjects: Subjects, replicas: int = 1, *, force: bool = False) -> Provisioned:
    """Create each stream, or bring an existing one to the declared settings.

    A change that would weaken a stream's durability (fewer replicas, memory storage, another
    retention or discard policy, tighter limits) is applied only with `force`; otherwise the
    stream keeps its current setting and the change is reported as refused. So provisioning an
    R3 cluster's streams again with the default of one replica leaves them at three.
    """
    result = Provisioned()
    for config in stream_configs(subjects, replicas):
        assert config.name is not None
        try:
            current = (await js.stream_info(config.name)).config
        except NotFoundError:
            await js.add_stream(config)
            result.created.append(config.name)
            continue
        changes = _differences(current, config)
        refused = [] if force else [change for change in changes if change.weakens]
        if len(refused) < len(changes):
            kept = {change.setting: change.current for change in refused}
            await js.update_stream(replace(config, **kept))
        result.changed += [change for change in changes if change not in refused]
        result.refused += refused
    names = StreamNames.for_prefix(subjects.prefix)
    for bucket in (names.scheduler, names.ledger):
        await _provision_bucket(js, bucket, replicas, force, result)
    for stream in result.created:
        log.info("stream created: %s", stream)
    for applied in result.changed:
        log.info("stream updated: %s", applied)
    for refusal in result.refused:
        log.warning("stream change refused, it would weaken the stream: %s", refusal)
    return result
