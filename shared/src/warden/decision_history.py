"""The gate's recorded decisions, read back from the events stream: what `warden policy replay` re-evaluates.

Only nats-py is needed: the decisions are read with an ordered, filtered consumer (warden.reader),
so a tenant's credential reads its own tenant's and an operator's every tenant's. Each decision
event is read as JSON rather than validated into its model: a replay of months of history reads
hundreds of thousands of them, and the fields it needs are checked one by one here (a message
that is not a well-formed decision is counted, never guessed at).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pydantic_core
from nats.aio.client import Client as NatsClient

from warden.reader import read_stored
from warden.streams import StreamNames
from warden.subjects import Subjects


@dataclass(frozen=True)
class RecordedDecision:
    """One decision as the gate recorded it: what it decided, under which revision, on which input."""

    stream_seq: int
    decision_id: str
    tenant: str
    run_id: str
    request_type: str
    time: str
    effect: str
    reasons: tuple[str, ...]
    policy_revision: str
    # The policy input the decision was made on; None for a decision recorded before inputs were.
    input: dict[str, Any] | None


def decision_from_event(stream_seq: int, body: bytes) -> RecordedDecision | None:
    """The recorded decision in one stored `decision.made` event, or None if it is not one."""
    try:
        envelope = pydantic_core.from_json(body)
        data = envelope["data"]
        reasons = data["reasons"]
        recorded_input = data.get("input")
        decision = RecordedDecision(
            stream_seq=stream_seq,
            decision_id=data["decision_id"],
            tenant=envelope["tenant"],
            run_id=envelope["entity_id"],
            request_type=data["request_type"],
            time=envelope["time"],
            effect=data["effect"],
            reasons=tuple(reasons),
            policy_revision=data["policy_revision"],
            input=recorded_input,
        )
    except (ValueError, KeyError, TypeError):
        return None
    well_formed = (
        envelope.get("type") == "decision.made"
        and all(isinstance(value, str) for value in (decision.decision_id, decision.tenant, decision.effect))
        and all(isinstance(reason, str) for reason in reasons)
        and (recorded_input is None or isinstance(recorded_input, dict))
    )
    return decision if well_formed else None


async def read_decision_events(
    nc: NatsClient,
    prefix: str,
    sink: Callable[[int, bytes], None],
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Hand every stored decision event (one tenant's, or all), from `since` on, to `sink` in stream
    order, as its stream sequence and bytes, unparsed: `warden policy replay` parses them in its
    worker processes, so this process only reads. Returns how many were read.
    """
    stream, subject = StreamNames.for_prefix(prefix).events, Subjects(prefix).decisions(tenant)
    return await read_stored(nc, stream, subject, sink, since=since, progress=progress, what="recorded decisions")
