"""The one way every Warden service process starts: settings from the environment, logging, run."""

import asyncio
from collections.abc import Callable

from faststream import FastStream

from shared.logging import configure_logging
from shared.settings import Settings


def run_service(name: str, build_app: Callable[[Settings], FastStream]) -> None:
    settings = Settings()
    configure_logging(name, settings.log_level, settings.log_format)
    asyncio.run(build_app(settings).run())
