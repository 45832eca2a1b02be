"""The audit projector: the only writer to Postgres, projecting every audited stream into tables."""

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import structlog
from faststream import FastStream
from faststream.nats import NatsBroker

from services.audit_projector.handlers import consume_stream, reset_consumer
from services.audit_projector.store import RETRYABLE_DB_ERRORS, AuditStore, LeadershipLost, create_pool
from shared.service import run_service
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
        consumers = []
        for stream, filter_subject in filters.items():
            await reset_consumer(js, stream, filter_subject, positions.get(stream, 0) + 1, BATCH_SIZE)
            consumer = asyncio.create_task(consume_stream(js, store, stream, BATCH_SIZE, BATCH_WAIT_SECONDS))
            consumer.add_done_callback(_exit_on_failure)
            consumers.append(consumer)
        log.info("projecting", positions=positions)
        try:
            yield
        finally:
            for consumer in consumers:
                consumer.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            await store.release()
            await pool.close()

    return FastStream(broker, lifespan=lifespan)


def _exit_on_failure(task: "asyncio.Task[None]") -> None:
    """Crash-only: a consumer that died (or lost leadership) takes the process down to be restarted."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    if isinstance(error, LeadershipLost):
        log.error("another projector took over; exiting", error=str(error))
    else:
        log.error("projection stopped by an unexpected error; exiting", error=repr(error))
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
