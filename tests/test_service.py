"""A service process stops on SIGTERM at any moment, even while it is still waiting to start."""

import asyncio
import os
import signal
import socket
import sys

from tests.conftest import REPO_ROOT


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
        "services.audit_projector",
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
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert returncode == 0
