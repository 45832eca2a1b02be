"""A service whose shutdown never finishes, run by test_service.py to show the shutdown deadline."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from faststream import FastStream
from faststream.nats import NatsBroker

from warden.service import interruptible_startup, run_service
from warden.settings import Settings


def build_app(settings: Settings) -> FastStream:
    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with interruptible_startup(app, settings.shutdown_deadline_seconds):
            pass
        print("started", flush=True)
        try:
            yield
        finally:
            await asyncio.Event().wait()  # a close that never returns

    app = FastStream(NatsBroker(settings.nats_url), lifespan=lifespan)
    return app


if __name__ == "__main__":
    run_service("hung-service", build_app)
