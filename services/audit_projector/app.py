"""The audit projector: the only writer to Postgres, projecting every audited stream into tables."""

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import structlog
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.message import NatsBatchMessage
from faststream.params import NoCast
from nats.aio.msg import Msg

from services.audit_projector.handlers import DURABLE_NAME, project_batch, reset_consumer
from services.audit_projector.store import RETRYABLE_DB_ERRORS, AuditStore, LeadershipLost, create_pool
from shared.logging import configure_logging
from shared.settings import Settings
from shared.streams import StreamNames
from shared.subjects import Subjects

SERVICE = "audit-projector"
BATCH_SIZE = 1000
# How long a partial batch may wait for more messages: the projection's added latency when idle.
BATCH_WAIT_SECONDS = 0.05

log = structlog.get_logger(__name__)


async def _wait_for_postgres(database_url: str) -> asyncpg.Pool:
    delay = 0.2
    while True:
        try:
            return await create_pool(database_url)
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("postgres not reachable yet", retry_in_s=delay, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _keep_raw(message: NatsBatchMessage) -> list[Msg]:
    # The projector records bytes as they are, even when they are not JSON: no decoding here.
    return message.raw_message


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    broker = NatsBroker(settings.nats_url)
    filters = {streams.commands: subjects.all_commands, streams.events: subjects.all_events}

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        pool = await _wait_for_postgres(settings.database_url)
        store = AuditStore(pool, subjects)
        await store.ensure_schema(list(filters))
        await store.become_active(settings.database_url)
        positions = await store.positions()
        await broker.connect()
        js = broker.config.connection_state.stream
        for stream, filter_subject in filters.items():
            await reset_consumer(js, stream, filter_subject, positions.get(stream, 0) + 1, BATCH_SIZE)
            _subscribe(broker, store, stream, filter_subject)
        log.info("projecting", positions=positions)
        try:
            yield
        finally:
            await store.release()
            await pool.close()

    return FastStream(broker, lifespan=lifespan)


def _subscribe(broker: NatsBroker, store: AuditStore, stream: str, filter_subject: str) -> None:
    @broker.subscriber(
        filter_subject,
        stream=JStream(stream, declare=False),
        durable=DURABLE_NAME,
        pull_sub=PullSub(batch_size=BATCH_SIZE, timeout=BATCH_WAIT_SECONDS, batch=True),
        # Manual: the handler acks once the batch is committed, and never terms (it stores garbage too).
        ack_policy=AckPolicy.MANUAL,
        decoder=_keep_raw,
    )
    async def project(messages: NoCast[list[Msg]]) -> None:
        try:
            await project_batch(store, stream, messages)
        except LeadershipLost as exc:
            # Crash-only: stop at once and let the supervisor restart this process as a standby.
            log.error("another projector took over; exiting", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            raise


def main() -> None:
    settings = Settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    asyncio.run(build_app(settings).run())


if __name__ == "__main__":
    main()
