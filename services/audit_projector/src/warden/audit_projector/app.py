"""The audit projector: the only writer to Postgres, projecting every audited stream into tables."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import structlog
from faststream import FastStream
from faststream.nats import NatsBroker, NatsRouter
from nats.js import JetStreamContext

from warden.admission import CommandRules
from warden.audit_chain import CheckpointDocument
from warden.audit_projector.advisories import (
    AdvisoryRecorder,
    advisories_router,
    set_up_consumer,
    set_up_once_provisioned,
    watch_consumer,
)
from warden.audit_projector.checkpoints import CheckpointWriter
from warden.audit_projector.handlers import DURABLE_NAME, StreamProjection
from warden.audit_projector.store import (
    RETRYABLE_DB_ERRORS,
    AuditStore,
    SchemaNotInstalled,
    close_pool,
    create_pool,
)
from warden.bus import retry_transient
from warden.channels import ServiceChannels
from warden.consumers import watch_ground
from warden.database import DatabaseRole
from warden.logging import FASTSTREAM_LOGGER
from warden.messages import MessageDeadLettered, StreamGapDetected, make_envelope
from warden.service import (
    BackgroundLoops,
    interruptible_startup,
    run_service,
    service_broker,
    service_inbox_prefix,
)
from warden.settings import Settings
from warden.signing import Signer, SigningKeyError
from warden.streams import StreamNames
from warden.subjects import SYSTEM_TENANT, Subjects

SERVICE = "audit-projector"
BATCH_SIZE = 1000
# How long a partial batch may wait for more messages: the projection's added latency when idle.
BATCH_WAIT_SECONDS = 0.05

log = structlog.get_logger(__name__)


async def _wait_for_installed_database(database_url: str, streams: list[str], rules: CommandRules) -> AuditStore:
    """Connect, and wait until the audit tables are installed (the projector's role cannot create them)."""
    delay = 0.2
    while True:
        pool: asyncpg.Pool | None = None
        try:
            pool = await create_pool(database_url)
            store = AuditStore(pool, rules)
            await store.check_schema(streams)
            return store
        except RETRYABLE_DB_ERRORS as exc:
            log.warning("postgres not reachable yet", retry_in_s=delay, error=repr(exc))
        except SchemaNotInstalled as exc:
            log.warning("waiting for the audit tables", retry_in_s=delay, reason=str(exc))
        except BaseException:
            if pool is not None:
                await close_pool(pool)
            raise
        if pool is not None:
            await close_pool(pool)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


def channels(prefix: str) -> ServiceChannels:
    """What the projector receives and sends, as FastStream declares it: schemas/asyncapi.json is made from this."""
    declared = ServiceChannels(SERVICE, prefix)
    for channel, stream in (("commands", declared.streams.commands), ("events", declared.streams.events)):
        declared.receives(
            channel,
            declared.everything_on(channel),
            stream=stream,
            consumer="pull",
            durable=DURABLE_NAME,
            how=f"Every message of {stream}, valid or not, in batches of up to {BATCH_SIZE}; a batch is "
            "acknowledged only once the transaction holding its rows and position has committed, and "
            "nothing is ever given up on.",
        )
    declared.sends(
        "events",
        (StreamGapDetected.TYPE, MessageDeadLettered.TYPE),
        stream=declared.streams.events,
        how="The holes it finds in a stream and the messages consumers gave up on, under the tenant _warden.",
    )
    declared.sends(
        "checkpoints",
        (),
        stream=declared.streams.checkpoints,
        address=f"{prefix}.chk.{{tenant}}.{{stream}}",
        schema=CheckpointDocument,
        how="Signed checkpoints of each tenant's audit chain in each stream, the anchors `warden audit "
        "verify` checks the tables against.",
    )
    return declared


def build_app(settings: Settings | None = None) -> FastStream:
    settings = settings or Settings()
    subjects = Subjects(settings.subject_prefix)
    streams = StreamNames.for_prefix(settings.subject_prefix)
    broker = service_broker(settings, SERVICE)
    declared = channels(settings.subject_prefix)
    broker.include_router(declared.router)
    filters = {streams.commands: subjects.all_commands, streams.events: subjects.all_events}
    advisories = _advisories_router(settings, broker, subjects, streams)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with interruptible_startup(app, settings.shutdown_deadline_seconds):
            database_url = settings.database_url_for(DatabaseRole.PROJECTOR)
            rules = CommandRules(subjects, settings.max_command_bytes)
            store = await _wait_for_installed_database(database_url, list(filters), rules)
            pool = store.pool
            await store.become_active(database_url)
            positions = await store.positions()
            await broker.connect()
            js = broker.connection.jetstream()
            checkpoints = _checkpoint_writer(settings, js, declared)
            if checkpoints is not None:
                store.chained = checkpoints.committed
                loops.start(checkpoints.run())
                signing.append(checkpoints)

            async def record_gap(stream: str, first_seq: int, last_seq: int) -> None:
                # The event first: once the position has moved past the gap, nothing would find it again.
                gap = StreamGapDetected(stream=stream, first_seq=first_seq, last_seq=last_seq)
                event = make_envelope(gap, tenant=SYSTEM_TENANT, entity_id=stream, actor=SERVICE, source=SERVICE)
                await declared.store(event, f"gap-{stream}-{first_seq}-{last_seq}")
                await store.record_gap(stream, first_seq, last_seq)

            for stream, filter_subject in filters.items():
                projection = StreamProjection(
                    js,
                    store,
                    stream,
                    filter_subject,
                    batch=BATCH_SIZE,
                    wait=BATCH_WAIT_SECONDS,
                    record_gap=record_gap,
                )
                loops.start(projection.run(positions.get(stream, 0)))
                loops.start(watch_ground(_consumer_check(js, stream), f"the consumer {DURABLE_NAME} on {stream}"))
            # Only the active projector records dead letters, as it alone writes the projection.
            loops.start(_record_advisories(broker, advisories, js, streams, broker_started))
            log.info("projecting", positions=positions)
        try:
            yield
        finally:
            await loops.stop()
            await store.release()
            await close_pool(pool)

    app = FastStream(broker, lifespan=lifespan, logger=FASTSTREAM_LOGGER)
    loops = BackgroundLoops(app)
    signing: list[CheckpointWriter] = []  # the lifespan's checkpoint writer, once it has one
    broker_started = asyncio.Event()
    app.after_startup(broker_started.set)

    # A shutdown hook, run after the loops' (hooks run in order) and before the broker disconnects:
    # the lifespan's own clean-up comes after, when publishing a checkpoint can only fail.
    @app.on_shutdown
    async def sign_last_checkpoints() -> None:
        for checkpoints in signing:
            await _last_checkpoints(checkpoints)

    return app


def _advisories_router(settings: Settings, broker: NatsBroker, subjects: Subjects, streams: StreamNames) -> NatsRouter:
    """The advisories subscriber, recording with the broker's connection once it has one."""

    def jetstream() -> JetStreamContext:
        return broker.connection.jetstream()

    recorder = AdvisoryRecorder(jetstream, subjects, streams, source=SERVICE)
    return advisories_router(recorder, streams, inbox_prefix=service_inbox_prefix(settings, SERVICE))


async def _record_advisories(
    broker: NatsBroker,
    advisories: NatsRouter,
    js: JetStreamContext,
    streams: StreamNames,
    broker_started: asyncio.Event,
) -> None:
    """Set up the advisories consumer (once its stream exists), then start its subscriber on the
    running broker, and watch that the consumer stays.

    Started here rather than by the broker: the subscriber's start asks the server about its
    consumer, and during a leader election that times out. Left to the broker, it failed the
    projector's whole start-up (tests/test_cluster.py); here it is waited out like any passing bus
    failure.
    """
    if not await set_up_consumer(js, streams):
        await set_up_once_provisioned(js, streams)
    await broker_started.wait()
    broker.include_router(advisories)
    for subscriber in advisories.subscribers:
        await retry_transient(subscriber.start, what=f"the advisories subscriber on {streams.advisories}")
    await watch_consumer(js, streams)


def _checkpoint_writer(settings: Settings, js: JetStreamContext, declared: ServiceChannels) -> CheckpointWriter | None:
    """The checkpoint writer, or None (loudly) when the projector has no checkpoint key."""
    try:
        signer = Signer.from_file(settings.checkpoint_key_path(), "checkpoint signing key")
    except SigningKeyError as exc:
        log.error("no checkpoint key: the audit chains get no signed checkpoints", reason=str(exc))
        return None
    publisher, stream = declared.publishers["checkpoints"]
    return CheckpointWriter(
        js,
        publisher,
        signer,
        declared.subjects,
        stream,
        every_events=settings.checkpoint_every_events,
        every_seconds=settings.checkpoint_every_seconds,
    )


async def _last_checkpoints(checkpoints: CheckpointWriter) -> None:
    """Sign what the chains reached before stopping, so a clean stop leaves nothing unanchored."""
    try:
        await asyncio.wait_for(checkpoints.publish_due(everything=True), 5.0)
    except Exception as exc:  # stopping anyway: the next start signs these heads
        log.warning("last checkpoints not published", error=repr(exc))


def _consumer_check(js: JetStreamContext, stream: str) -> Callable[[], Awaitable[object]]:
    return lambda: js.consumer_info(stream, DURABLE_NAME)


def main() -> None:
    run_service(SERVICE, build_app)


if __name__ == "__main__":
    main()
