"""The policy lifecycle as every reader folds it from `policy.changed`: the bundle in force and the shadow."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from warden.errors import InvalidMessage
from warden.messages import PolicyChanged, parse_envelope
from warden.reader import FilteredReader
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import TYPE_HEADER

# Standard logging, routed through the services' structlog set-up: a client-only install has no structlog.
log = logging.getLogger(__name__)

Bundle = TypeVar("Bundle")


@dataclass
class Lifecycle(Generic[Bundle]):
    """Where the policy stands after the `policy.changed` events folded so far, in stream order.

    `Bundle` is what a reader keeps of each bundle: the gate its loaded engine, the runner its
    files, a status listing its revision. Every reader folds by these rules, so the gates, the
    runners and `warden policy status` agree on the bundle in force.
    """

    active: Bundle
    revision_of: Callable[[Bundle], str]
    shadow: Bundle | None = None
    # The bundles in force before each promote still standing, the latest last: what rollbacks return to.
    earlier: list[Bundle] = field(default_factory=list)
    # Where the bundle in force came from: the configured one (""), or the event that put it in force.
    origin: str = ""

    def next_active(self, changed: PolicyChanged) -> Bundle | None:
        """The bundle a promote or rollback puts in force, if this reader can follow it (else None)."""
        if (
            changed.change == "promote"
            and self.shadow is not None
            and self.revision_of(self.shadow) == changed.revision
        ):
            return self.shadow
        if changed.change == "rollback" and self.earlier and self.revision_of(self.earlier[-1]) == changed.revision:
            return self.earlier[-1]
        return None

    def apply(self, changed: PolicyChanged, stream_seq: int, shadow: Callable[[], Bundle | None]) -> str | None:
        """Fold one event in (`shadow` makes a shadow's bundle from it, None if it cannot); why it
        could not be followed, if not.

        A change that cannot be followed (a promote of another shadow than the one held: two changes
        decided at once by two gates) leaves the state as it was.
        """
        origin = f"events:{stream_seq}"
        if changed.change == "withdraw":
            if self.shadow is None or self.revision_of(self.shadow) != changed.revision:
                return f"cannot follow the withdrawal of {changed.revision} ({origin}): it is not the shadow here"
            self.shadow = None
            return None
        if changed.change == "shadow":
            loaded = shadow()
            if loaded is None:
                return f"the shadow bundle of {origin} could not be loaded here"
            self.shadow = loaded
            return None
        following = self.next_active(changed)
        if following is None:
            return f"cannot follow the {changed.change} to {changed.revision} ({origin}): no such bundle here"
        if changed.change == "promote":
            self.earlier.append(self.active)
            self.shadow = None
        else:
            self.earlier.pop()
        self.active, self.origin = following, origin
        return None


async def follow_policy_changes(
    nc: NatsClient, prefix: str, on_change: Callable[[PolicyChanged, int], Awaitable[None]]
) -> FilteredReader:
    """Read every `policy.changed` from the stream's start into `on_change` (with its stream
    sequence), return once those stored now are read, and go on reading the new ones."""
    caught_up = asyncio.Event()

    async def on_message(message: Msg) -> None:
        seq = message.metadata.sequence.stream
        try:
            changed = parse_envelope(message.data, type_hint=(message.headers or {}).get(TYPE_HEADER)).data
        except InvalidMessage as exc:
            log.error("an unreadable policy.changed event at events:%d; not followed: %s", seq, exc)
            changed = None
        if isinstance(changed, PolicyChanged):
            await on_change(changed, seq)
        if message.metadata.num_pending == 0:
            caught_up.set()

    subjects = Subjects(prefix)
    reader = FilteredReader(
        nc, StreamNames.for_prefix(prefix).events, subjects.policy_events_of_type(PolicyChanged), on_message
    )
    await reader.start()
    if reader.pending_at_start:
        await caught_up.wait()
    return reader
