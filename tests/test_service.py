"""A service process stops on SIGTERM at any moment: while still waiting to start, or with a close that hangs."""

import asyncio
import os
import signal
import socket
import sys

import asyncpg
import pytest

from tests.conftest import REPO_ROOT, Servers, eventually
from warden.audit_projector import store
from warden.database import DatabaseRole
from warden.service import SHUTDOWN_OVERRUN_STATUS
from warden.settings import Settings


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def stopped_by_sigterm(process: asyncio.subprocess.Process, within: float = 10.0) -> int:
    """Send SIGTERM and return the exit status, which must come within `within` seconds."""
    process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), within)


async def killed(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_projector_waiting_for_postgres_stops_on_sigterm() -> None:
    """FastStream only watches for a signal once the lifespan has started: a projector whose Postgres
    never comes (its supervisor gone with it) used to wait on, an orphan, after SIGTERM."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WARDEN_")}
    env |= {
        "WARDEN_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{_closed_port()}/nowhere",
        "WARDEN_NATS_URL": f"nats://127.0.0.1:{_closed_port()}",
        "WARDEN_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden.audit_projector",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        output = b""
        while b"postgres not reachable yet" not in output:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, f"the projector exited before waiting for Postgres: {output.decode()}"
            output += line
        assert await stopped_by_sigterm(process) == 0
    finally:
        await killed(process)


async def test_a_service_whose_shutdown_hangs_exits_at_its_deadline(servers: Servers) -> None:
    """A close that never returns does not keep a stopping service alive: it exits at its deadline, to be restarted."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WARDEN_")}
    env |= {"WARDEN_NATS_URL": servers.nats_url, "WARDEN_SHUTDOWN_DEADLINE_SECONDS": "1", "WARDEN_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.hung_service", cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 30) == b"started\n"
        assert await stopped_by_sigterm(process) == SHUTDOWN_OVERRUN_STATUS
    finally:
        await killed(process)


async def test_closing_a_pool_cuts_connections_that_are_never_given_back(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection stuck in a transaction does not hold up closing the projector's pool: it is cut."""
    monkeypatch.setattr(store, "CLOSE_TIMEOUT_SECONDS", 0.5)
    pool = await store.create_pool(settings.database_url_for(DatabaseRole.PROJECTOR))
    stuck = await pool.acquire()
    await stuck.execute("BEGIN; SELECT 1")
    backend = stuck.get_server_pid()
    await asyncio.wait_for(store.close_pool(pool), 5)
    observer = await asyncpg.connect(settings.database_url_for(DatabaseRole.READER))
    try:
        gone = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1"
        await eventually(lambda: observer.fetchval(gone, backend), within=5)
    finally:
        await observer.close()
