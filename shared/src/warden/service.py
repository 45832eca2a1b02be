"""The one way every Warden service process starts and runs its long-lived consumer loops."""

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.nats.security import NatsNKey
from nats.aio.client import DEFAULT_INBOX_PREFIX
from nats.js import JetStreamContext

from warden.channels import ServiceChannels
from warden.identity import connect_options
from warden.logging import FASTSTREAM_LOGGER, configure_logging
from warden.settings import Settings
from warden.telemetry import configure_tracing
from warden.wire import SERVICE_CONNECT_OPTIONS, server_urls

log = structlog.get_logger(__name__)

# Exit status of a service whose shutdown overran its deadline (EX_SOFTWARE).
SHUTDOWN_OVERRUN_STATUS = 70


def run_service(name: str, build_app: Callable[[Settings], FastStream]) -> None:
    settings = Settings()
    configure_logging(name, settings.log_level, settings.log_format)
    configure_tracing(name)
    try:
        asyncio.run(build_app(settings).run())
    except asyncio.CancelledError:
        log.info("stopped before it had started")  # a signal during start-up (see interruptible_startup)
    except Exception:
        # As one JSON line like every other, not a bare traceback on stderr; the status is Python's own.
        log.exception("the service stopped on an error")
        raise SystemExit(1) from None


def _arm_shutdown_deadline(seconds: float) -> None:
    """Exit the process `seconds` from now, whatever is still closing (once: a second signal changes nothing).

    A hung close (a Postgres pool waiting on a stuck transaction, say) must not keep a stopping
    service alive, and so keep its supervisor from restarting it.
    """

    context = structlog.contextvars.get_contextvars()  # the timer's thread has none of its own
    loop = asyncio.get_running_loop()

    def overdue() -> None:
        # What was still running, for whoever reads the log: the loop is stuck or busy, so this
        # reads its tasks from another thread, which is fine for a last word before exiting.
        pending = [_describe_task(task) for task in asyncio.all_tasks(loop)]
        log.error("shutdown overran its deadline; exiting now", deadline_s=seconds, pending=pending, **context)
        os._exit(SHUTDOWN_OVERRUN_STATUS)

    if _Deadline.armed:
        return
    _Deadline.armed = True
    # A thread, not a task: it must fire even when the event loop itself is stuck.
    timer = threading.Timer(seconds, overdue)
    timer.daemon = True
    timer.start()


def _describe_task(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack(limit=4)
    where = " <- ".join(
        f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})" for frame in frames
    )
    return f"{task.get_name()}: {where}"


class _Deadline:
    armed = False


@asynccontextmanager
async def interruptible_startup(app: FastStream, shutdown_deadline_seconds: float) -> AsyncIterator[None]:
    """Let SIGTERM and SIGINT stop a service at any moment, and within a bounded time.

    FastStream enters the lifespan before it starts watching for its exit flag, so a signal during
    a lifespan's start-up was only noted, and a service waiting for a database that never came
    (its supervisor gone) lived on. During start-up a signal cancels the start-up instead; once it
    is done, the signal starts FastStream's clean shutdown, with a deadline past which the process
    exits anyway (see `_arm_shutdown_deadline`).
    """
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    if starting is None:
        raise RuntimeError("interruptible_startup must be entered from a task")
    handled = (signal.SIGINT, signal.SIGTERM)
    for number in handled:
        loop.add_signal_handler(number, starting.cancel)

    def shut_down() -> None:
        _arm_shutdown_deadline(shutdown_deadline_seconds)
        app.exit()

    try:
        yield
    finally:
        for number in handled:
            loop.add_signal_handler(number, shut_down)


class BackgroundLoops:
    """A service's consumer loops: stopped before its broker closes, and crash-only while it runs.

    A loop that dies unexpectedly takes its process down (SIGTERM, a clean shutdown) so that the
    supervisor restarts it and the service rebuilds its state from the streams, rather than
    living on half-working.
    """

    def __init__(self, app: FastStream) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        # on_shutdown hooks run before the broker stops, so no loop sees its connection vanish.
        app.on_shutdown(self.stop)

    def start(self, loop: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(loop)
        self.tasks.add(task)
        task.add_done_callback(self._finished)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        self.stopping = True
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            # wait(), not gather(): the loops' own cancellation must not surface here as ours.
            await asyncio.wait(self.tasks, timeout=grace_seconds)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if self.stopping or task.cancelled() or task.exception() is None:
            return
        log.error("a consumer loop failed; stopping the process to be restarted", error=repr(task.exception()))
        os.kill(os.getpid(), signal.SIGTERM)


def service_broker(settings: Settings, role: str) -> NatsBroker:
    """The broker a service connects with: as its own identity, reconnecting for ever."""
    identity: dict[str, Any] = {}
    if (seed_file := settings.seed_file_for(role)) is not None:
        # Read (and its file's mode checked) here, so a bad credential stops the service at once.
        identity = {"security": NatsNKey(seed_file), "inbox_prefix": service_inbox_prefix(settings, role)}
    # FastStream's per-message log lines at DEBUG: at INFO they cost more than handling a message.
    return NatsBroker(
        server_urls(settings.nats_url),
        logger=FASTSTREAM_LOGGER,
        log_level=logging.DEBUG,
        **SERVICE_CONNECT_OPTIONS,
        **identity,
    )


def service_inbox_prefix(settings: Settings, role: str) -> str:
    """Where `role`'s connection receives replies: its identity's own inbox, the only one its
    permissions let it subscribe to (nats-py's default when it connects anonymously)."""
    seed_file = settings.seed_file_for(role)
    if seed_file is None:
        return DEFAULT_INBOX_PREFIX.decode()
    inbox: str = connect_options(seed_file)["inbox_prefix"]
    return inbox


def consumer_service(
    settings: Settings,
    channels: ServiceChannels,
    loop: Callable[[NatsBroker], Coroutine[Any, Any, Any]],
    ground: Callable[[JetStreamContext], Coroutine[Any, Any, Any]],
) -> FastStream:
    """A FastStream app whose work is one long-lived consumer loop, started once its broker is connected.

    It connects as its service's identity (`Settings.seed_file_for`), so the server holds it to that
    role's permissions, and carries the service's declared channels (`warden.channels`). Beside the
    loop runs `ground` (see `warden.consumers.watch_ground`): once what the loop reads from is gone,
    the process exits to be restarted rather than sit deaf.
    """
    broker = service_broker(settings, channels.service)
    broker.include_router(channels.router)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with interruptible_startup(app, settings.shutdown_deadline_seconds):
            await broker.connect()
            loops.start(loop(broker))
            loops.start(ground(broker.connection.jetstream()))
        yield

    app = FastStream(broker, lifespan=lifespan, logger=FASTSTREAM_LOGGER)
    loops = BackgroundLoops(app)
    return app
