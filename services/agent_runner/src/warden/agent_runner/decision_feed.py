"""The decisions on the tool calls of the runs this process executes, as JetStream stores them."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from warden.consumers import ordered_subscription
from warden.errors import InvalidMessage
from warden.messages import DecisionMade, parse_envelope
from warden.subjects import Subjects


class DecisionFeed:
    """Tool-call decisions on the runs this process is executing, as JetStream delivers them.

    One ordered consumer for the whole process, not one per run: a consumer per run cost the
    server a consumer created and deleted (and the runner two more round trips) for every run.
    Delivery by JetStream, not a core subscription, because a message reaches core subscribers
    before it is stored, and a tool may run only on a decision that is stored (promise 1). Every
    runner process sees every decision and drops those on runs it is not executing.
    """

    def __init__(self, js: JetStreamContext, subjects: Subjects, stream: str) -> None:
        self.js = js
        self.subjects = subjects
        self.stream = stream
        # run id -> tool call id -> every decision that came for it, with its stream sequence: a
        # forged one may come first, so none replaces another (see `decision`).
        self.runs: dict[str, dict[str, list[tuple[DecisionMade, int]]]] = {}
        self.arrivals: dict[str, asyncio.Event] = {}
        self.subscription: Any = None

    async def open(self) -> None:
        # From now on (NEW): a run that needs earlier decisions reads its history (read_history).
        self.subscription = await ordered_subscription(
            self.js,
            [self.subjects.events_of_type(DecisionMade)],
            self.stream,
            self._on_message,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def close(self) -> None:
        if self.subscription is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.subscription.unsubscribe()

    @contextlib.contextmanager
    def tracking(self, run_id: str) -> Iterator[None]:
        """Keep the decisions on this run from now until the run ends (before any are asked for)."""
        self.runs.setdefault(run_id, {})
        try:
            yield
        finally:
            self.runs.pop(run_id, None)

    async def _on_message(self, message: Msg) -> None:
        decisions = self.runs.get(self.subjects.entity_of(message.subject))
        if decisions is None:
            return  # a run some other runner executes, or a run decision
        try:
            envelope = parse_envelope(message.data, type_hint=DecisionMade.TYPE)
            self.subjects.check_envelope_subject(envelope, message.subject)
        except InvalidMessage:
            return
        verdict = envelope.data
        if isinstance(verdict, DecisionMade) and verdict.tool_call_id:
            decisions.setdefault(verdict.tool_call_id, []).append((verdict, message.metadata.sequence.stream))
            if arrived := self.arrivals.get(verdict.tool_call_id):
                arrived.set()

    async def decision(
        self,
        run_id: str,
        tool_call_id: str,
        within: float,
        accept: Callable[[DecisionMade, int | None], Awaitable[bool]],
    ) -> DecisionMade | None:
        """The first stored decision on one tool call that `accept` takes, waiting up to `within` seconds.

        Every decision that comes is put to `accept` in arrival order; one it refuses (a forgery,
        or an answer to another request) does not end the wait for the genuine one.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        arrived = self.arrivals.setdefault(tool_call_id, asyncio.Event())
        seen = 0
        try:
            while True:
                arrived.clear()
                candidates = self.runs.get(run_id, {}).get(tool_call_id, [])
                for verdict, seq in candidates[seen:]:
                    seen += 1
                    if await accept(verdict, seq):
                        return verdict
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), remaining)
        finally:
            self.arrivals.pop(tool_call_id, None)
