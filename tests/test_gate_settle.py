"""The gate's settling of commands, one handler's logic with stand-in messages (no broker needed).

The end-to-end behaviour (a command acked only once its outcome is stored) is shown against real
NATS in test_bad_input and test_governed_run; these cover the outcomes a healthy server never gives.
"""

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import PubAck

from tests.conftest import eventually
from warden import bus
from warden.policy_gate.app import MAX_DELIVERIES, Answer, Gate, channels
from warden.settings import Settings


@dataclass
class StandInCommand:
    """Just what `Gate.settle` reads of a delivered command, and a record of what it did to it."""

    num_delivered: int = 1
    subject: str = "settle.cmd.acme.run.submitted"
    settled: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> Any:
        return SimpleNamespace(num_delivered=self.num_delivered, sequence=SimpleNamespace(stream=7))

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def term(self) -> None:
        self.settled.append("term")

    async def respond(self, data: bytes) -> None:
        # How warden.consumers.terminate gives up on a message with a reason: `+TERM <reason>` on its reply subject.
        self.settled.append("term" if data.startswith(b"+TERM ") else f"respond {data!r}")

    async def in_progress(self) -> None:
        self.settled.append("in progress")


@dataclass
class StandInJetStream:
    """A JetStream whose publishes fail transiently `failures` times, then are stored."""

    failures: int = 0
    published: int = 0

    async def publish(self, subject: str, body: bytes, headers: dict[str, str], stream: str) -> PubAck:
        self.published += 1
        if self.published <= self.failures:
            raise nats.errors.NoRespondersError
        return PubAck(stream=stream, seq=self.published)


async def _settle(
    outcome: "asyncio.Future[PubAck]", command: StandInCommand, js: StandInJetStream | None = None
) -> list[str]:
    connection = SimpleNamespace(jetstream=lambda: js or StandInJetStream())
    gate = Gate(
        Settings(subject_prefix="settle"),
        cast(Any, connection),
        cast(Any, SimpleNamespace(engine=None)),
        channels("settle"),
    )
    answer = Answer(cast(Msg, command), "settle.evt.acme.command.7.command.rejected", b"{}", {})
    gate.unsettled.put_nowait((answer, outcome))
    settling = asyncio.create_task(gate.settle())

    async def settled() -> list[str]:
        return command.settled

    try:
        return cast(list[str], await eventually(settled, within=5))
    finally:
        settling.cancel()
        await asyncio.gather(settling, return_exceptions=True)


def _future() -> "asyncio.Future[PubAck]":
    return asyncio.get_running_loop().create_future()


async def test_a_stored_outcome_acks_the_command() -> None:
    stored = _future()
    stored.set_result(PubAck(stream="S", seq=1))
    assert await _settle(stored, StandInCommand()) == ["ack"]


async def test_a_refused_publish_naks_the_command_for_a_later_retry() -> None:
    refused = _future()
    refused.set_exception(RuntimeError("stream full"))
    assert await _settle(refused, StandInCommand()) == ["nak"]


@pytest.mark.parametrize("failure", ["cancelled", "no responders"])
async def test_a_transient_failure_is_retried_here_without_spending_a_delivery(failure: str) -> None:
    """nats-py cancels pending publishes when its connection drops, and a stream with no leader has no
    responders: the gate publishes the answer again until it is stored, then acks; no nak, no redelivery."""
    outcome = _future()
    if failure == "cancelled":
        outcome.cancel()
    else:
        outcome.set_exception(nats.errors.NoRespondersError())
    js = StandInJetStream(failures=3)
    assert await _settle(outcome, StandInCommand(), js) == ["ack"]
    assert js.published == 4


async def test_a_transient_failure_that_outlasts_the_deadline_is_redelivered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus, "TRANSIENT_DEADLINE_SECONDS", 0.3)
    outcome = _future()
    outcome.set_exception(nats.errors.NoRespondersError())
    assert await _settle(outcome, StandInCommand(), StandInJetStream(failures=1_000)) == ["nak"]


async def test_the_last_allowed_delivery_is_terminated_not_retried_forever() -> None:
    outcome = _future()
    outcome.set_exception(RuntimeError("stream full"))
    assert await _settle(outcome, StandInCommand(num_delivered=MAX_DELIVERIES)) == ["term"]
