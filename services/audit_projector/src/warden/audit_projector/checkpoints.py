"""The projector's signed checkpoints: every so many rows or seconds per chain, its head, signed and kept in JetStream.

A checkpoint goes to `<prefix>.chk.<tenant>.<stream>` on the checkpoints stream, which refuses
deletes and purges to every identity. Each is published with `Nats-Expected-Last-Subject-Sequence`
set to the sequence of the chain's previous checkpoint, so the server appends it only on top of
that one: a second writer (or a forger allowed to publish) cannot slip one in between unnoticed,
and the checkpoints of a chain form one ordered line whose later entries cover the earlier ones.
Only heads already committed to Postgres are signed (the store reports them after each commit).
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import structlog
from faststream.nats.publisher.usecase import LogicPublisher
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from warden.audit_chain import ChainId, Checkpoint, Head
from warden.signing import Signer
from warden.subjects import Subjects

log = structlog.get_logger(__name__)

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
# How often the writer looks for chains due a checkpoint when nothing hurries it.
TICK_SECONDS = 0.5


@dataclass
class _Signed:
    index: int  # the chain index of its last checkpoint (0: none)
    seq: int  # that checkpoint's sequence in the stream (0: none)
    at: float  # monotonic time it was made (or the chain first seen)


class CheckpointWriter:
    """Signs and publishes checkpoints of the chains the projector extends."""

    def __init__(
        self,
        js: JetStreamContext,
        publisher: LogicPublisher,
        signer: Signer,
        subjects: Subjects,
        stream: str,
        *,
        every_events: int,
        every_seconds: float,
    ) -> None:
        self.js = js
        self.publisher = publisher  # the projector's declared checkpoints publisher (warden.channels)
        self.signer = signer
        self.subjects = subjects
        self.stream = stream
        self.every_events = every_events
        self.every_seconds = every_seconds
        self.heads: dict[ChainId, Head] = {}
        self.signed: dict[ChainId, _Signed] = {}
        self.due = asyncio.Event()

    def committed(self, stream: str, tenant: str, index: int, head: bytes) -> None:
        """A chain's head as committed (called by the store after each batch)."""
        chain = (stream, tenant)
        self.heads[chain] = Head(index, head)
        signed = self.signed.get(chain)
        if signed is None or index - signed.index >= self.every_events:
            self.due.set()

    async def run(self) -> None:
        """Publish checkpoints as chains fall due, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.due.wait(), TICK_SECONDS)
            self.due.clear()
            try:
                await self.publish_due()
            except (nats.errors.Error, OSError) as exc:
                # NATS away (or the stream not provisioned yet): the heads wait for the next round.
                log.warning("checkpoints not published; will retry", error=repr(exc))

    async def publish_due(self, *, everything: bool = False) -> int:
        """Publish a checkpoint for every chain due one (every chain that grew, with `everything`); return how many."""
        published = 0
        now = time.monotonic()
        for chain, head in list(self.heads.items()):
            signed = self.signed.get(chain)
            if signed is None:
                signed = self.signed[chain] = await self._last_signed(chain, now)
            grown = head.last_index - signed.index
            if grown <= 0:
                continue
            due = everything or grown >= self.every_events or now - signed.at >= self.every_seconds
            if due and await self._publish(chain, head, signed, now):
                published += 1
        return published

    async def _last_signed(self, chain: ChainId, now: float) -> _Signed:
        """The chain's last checkpoint in the stream, where the next must go on top of."""
        stream, tenant = chain
        try:
            message = await self.js.get_last_msg(self.stream, self.subjects.checkpoint(tenant, stream))
        except NotFoundError:
            return _Signed(0, 0, now)
        checkpoint = Checkpoint.from_json(message.data or b"")
        return _Signed(checkpoint.index, message.seq or 0, now)

    async def _publish(self, chain: ChainId, head: Head, signed: _Signed, now: float) -> bool:
        stream, tenant = chain
        unsigned = Checkpoint(stream, tenant, head.last_index, head.hash, datetime.now(UTC), self.signer.public_key)
        checkpoint = Checkpoint(**{**vars(unsigned), "signature": self.signer.sign_bytes(unsigned.signed_bytes())})
        subject = self.subjects.checkpoint(tenant, stream)
        try:
            ack = await self.publisher.publish(
                checkpoint.to_json(),
                subject=subject,
                stream=self.stream,
                headers={EXPECTED_LAST_SUBJECT_SEQUENCE: str(signed.seq), "content-type": "application/json"},
            )
        except APIError as exc:
            # Someone else appended to this chain's line (a previous projector's last word): read
            # where it ends now and sign on top of it next time.
            log.warning("checkpoint refused; rereading the chain's last one", subject=subject, error=str(exc))
            del self.signed[chain]
            return False
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
            log.warning("checkpoint not published; will retry", subject=subject, error=repr(exc))
            return False
        self.signed[chain] = _Signed(head.last_index, ack.seq, now)
        log.info("checkpoint", stream=stream, tenant=tenant, index=head.last_index, seq=ack.seq)
        return True
