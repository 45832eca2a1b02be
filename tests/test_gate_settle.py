"""The gate's settling of commands, one handler's logic with stand-in messages (no broker needed).

The end-to-end behaviour (a command acked only once its outcome is stored) is shown against real
NATS in test_bad_input and test_governed_run; these cover the outcomes a healthy server never gives.
"""

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats.aio.msg import Msg
from nats.js.api import PubAck

from services.policy_gate.app import MAX_DELIVERIES, Gate
from shared.settings import Settings
from tests.conftest import eventually


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


async def _settle(outcome: "asyncio.Future[PubAck]", command: StandInCommand) -> list[str]:
    gate = Gate(Settings(subject_prefix="settle"), cast(Any, None), cast(Any, None))
    gate.unsettled.put_nowait((cast(Msg, command), outcome))
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


async def test_a_publish_cancelled_by_the_client_naks_instead_of_stopping_the_gate() -> None:
    """nats-py cancels pending publishes when its connection closes; that is a failed publish."""
    cancelled = _future()
    cancelled.cancel()
    assert await _settle(cancelled, StandInCommand()) == ["nak"]


@pytest.mark.parametrize("failure", ["refused", "cancelled"])
async def test_the_last_allowed_delivery_is_terminated_not_retried_forever(failure: str) -> None:
    outcome = _future()
    if failure == "refused":
        outcome.set_exception(RuntimeError("stream full"))
    else:
        outcome.cancel()
    assert await _settle(outcome, StandInCommand(num_delivered=MAX_DELIVERIES)) == ["term"]
