"""JetStream stream definitions and their provisioning, which one component owns.

Only `provision()` (run by `warden up` or `warden provision`) creates or changes streams. Services
bind to them without declaring them, so no service can silently change a stream's limits.
"""

from dataclasses import dataclass

import structlog
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from shared.subjects import Subjects

log = structlog.get_logger(__name__)

# The hard ceiling JetStream enforces per message; the server's max_payload (deploy/nats) matches.
STREAM_MAX_MSG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StreamNames:
    """Stream names derived from the subject prefix, so each installation (and test) has its own."""

    commands: str
    events: str
    work: str

    @classmethod
    def for_prefix(cls, prefix: str) -> "StreamNames":
        stem = prefix.upper().replace("-", "_")
        return cls(commands=f"{stem}_COMMANDS", events=f"{stem}_EVENTS", work=f"{stem}_WORK")

    @property
    def audited(self) -> tuple[str, ...]:
        """The streams the audit trail is made of (work items are copies of audited commands)."""
        return (self.commands, self.events)


def _stream(
    name: str, *, description: str, subject: str, retention: RetentionPolicy, dedup_s: float, replicas: int
) -> StreamConfig:
    return StreamConfig(
        name=name,
        description=description,
        subjects=[subject],
        retention=retention,
        duplicate_window=dedup_s,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msg_size=STREAM_MAX_MSG_BYTES,
        # A full stream refuses new writes rather than silently dropping old audit records.
        discard=DiscardPolicy.NEW,
        allow_direct=True,
    )


def stream_configs(subjects: Subjects, replicas: int = 1) -> list[StreamConfig]:
    names = StreamNames.for_prefix(subjects.prefix)
    return [
        # Client retries within ten minutes are deduplicated by their Nats-Msg-Id.
        _stream(
            names.commands,
            description="Every command as received, valid or not: the audit trail's intake.",
            subject=subjects.all_commands,
            retention=RetentionPolicy.LIMITS,
            dedup_s=600.0,
            replicas=replicas,
        ),
        _stream(
            names.events,
            description="Every decision and every step of every run: append-only.",
            subject=subjects.all_events,
            retention=RetentionPolicy.LIMITS,
            dedup_s=120.0,
            replicas=replicas,
        ),
        _stream(
            names.work,
            description="Runs waiting for an agent runner; each is removed once a runner acks it.",
            subject=subjects.all_work,
            retention=RetentionPolicy.WORK_QUEUE,
            dedup_s=120.0,
            replicas=replicas,
        ),
    ]


_COMPARED_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "num_replicas",
    "max_msg_size",
    "duplicate_window",
    "discard",
    "description",
)


async def provision(js: JetStreamContext, subjects: Subjects, replicas: int = 1) -> list[str]:
    """Create each stream, or bring an existing one to the declared settings; return what changed."""
    changes = []
    for config in stream_configs(subjects, replicas):
        assert config.name is not None
        try:
            current = (await js.stream_info(config.name)).config
        except NotFoundError:
            await js.add_stream(config)
            changes.append(f"created {config.name}")
            continue
        differing = [f for f in _COMPARED_FIELDS if getattr(current, f) != getattr(config, f)]
        if differing:
            await js.update_stream(config)
            changes.append(f"updated {config.name}: {', '.join(differing)}")
    for change in changes:
        log.info("stream provisioned", change=change)
    return changes
