"""Test fixtures: real NATS JetStream and Postgres, with a private prefix, streams and database per test.

By default one embedded nats-server and one embedded PostgreSQL serve the whole session, with
authentication on: each test's installation gets identities of its own (one per role, admitted to
the server for the test's length), and its services connect as them, held to their permissions.
The fixtures themselves (creating and deleting each test's streams, reading them back) connect as
a superuser that only the test session has.

With WARDEN_NATS_URL and WARDEN_DATABASE_URL set, those servers are used instead; a NATS server
with authentication then needs WARDEN_NATS_SEED_FILE, a seed allowed everything, which every
process of the tests connects as (the per-role permission tests need the embedded server).
"""

import asyncio
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from faststream import FastStream
from nats.aio.client import Client as NatsClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import warden.service
from warden.audit_projector.install import drop_roles, install_database
from warden.credentials import CredentialStore, superuser
from warden.database import database_name, with_database, without_login
from warden.embedded import EmbeddedServers
from warden.identity import connect_options, public_key, read_seed
from warden.settings import Settings
from warden.streams import StreamNames, provision
from warden.subjects import Subjects

os.environ.pop("RUST_BACKTRACE", None)  # regorus errors stay readable

# One tracer provider for the whole session (OpenTelemetry allows one per process), recording in
# memory so a test can read back the spans of the traces it caused.
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)


@dataclass(frozen=True)
class Servers:
    nats_url: str
    database_url: str  # an administrator's login to any database on the server: for fixtures only
    superuser_seed: Path | None  # allowed everything: for the fixtures, never for the services
    embedded: "EmbeddedServers | None" = None  # None: external servers

    def superuser(self) -> dict[str, Any]:
        """nats-py options to connect as the session's superuser."""
        return connect_options(self.superuser_seed)

    def superuser_entry(self) -> dict[str, object]:
        """The superuser as a server's `users` entry, for servers a test starts itself."""
        assert self.superuser_seed is not None
        return {"nkey": public_key(read_seed(self.superuser_seed))}


@pytest.fixture(scope="session")
async def servers() -> AsyncIterator[Servers]:
    nats_url, database_url = os.environ.get("WARDEN_NATS_URL"), os.environ.get("WARDEN_DATABASE_URL")
    if nats_url and database_url:
        seed = os.environ.get("WARDEN_NATS_SEED_FILE")
        yield Servers(nats_url, database_url, Path(seed) if seed else None)
        return
    # Not under pytest's basetemp: pytest deletes old basetemps, even while another session
    # (a concurrent pytest) still has servers writing there.
    state_dir = Path(tempfile.mkdtemp(prefix="warden-tests-"))
    superuser_seed, superuser_entry = superuser(state_dir / "superuser")
    embedded = EmbeddedServers(state_dir, extra_users=[superuser_entry])
    endpoints = await embedded.start()
    try:
        yield Servers(endpoints.nats_url, endpoints.admin_database_url, superuser_seed, embedded)
    finally:
        await embedded.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
async def settings(servers: Servers) -> AsyncIterator[Settings]:
    """Settings private to this test: its own subject prefix, streams and database."""
    token = uuid.uuid4().hex[:12]
    prefix, database = f"t{token}", f"test_{token}"
    # The installation's identities: NATS seeds, signing keys and its database roles' passwords.
    credentials = CredentialStore(Path(tempfile.mkdtemp(prefix="warden-credentials-")), prefix)
    credentials.ensure_installation()
    identity: dict[str, Any] = {"nats_credentials_dir": credentials.directory}
    if servers.embedded is not None:
        await servers.embedded.authorize(admit=credentials)
    else:
        identity["nats_seed_file"] = servers.superuser_seed
    database_url = without_login(with_database(servers.database_url, database))
    await install_database(servers.database_url, database_url, credentials.directory, prefix)
    nc = await nats.connect(servers.nats_url, **servers.superuser())
    await provision(nc.jetstream(), Subjects(prefix))
    settings = Settings(
        nats_url=servers.nats_url,
        database_url=database_url,
        subject_prefix=prefix,
        log_format="console",
        **identity,
    )
    try:
        yield settings
    finally:
        names = StreamNames.for_prefix(prefix)
        for stream in names.installation:
            await nc.jetstream().delete_stream(stream)
        await nc.jetstream().delete_key_value(names.scheduler)
        await nc.jetstream().delete_key_value(names.ledger)
        await nc.close()
        if servers.embedded is not None:
            await servers.embedded.authorize(dismiss=credentials)
        shutil.rmtree(credentials.directory, ignore_errors=True)
        admin = await asyncpg.connect(with_database(servers.database_url, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        await drop_roles(servers.database_url, database)


@pytest.fixture
async def nc(servers: Servers, settings: Settings) -> AsyncIterator[NatsClient]:
    """A connection allowed everything (the session's superuser): what a test inspects or attacks with."""
    client = await nats.connect(settings.nats_url, **servers.superuser())
    yield client
    await client.close()


@pytest.fixture
async def db(servers: Servers, settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """The test's database as its administrator: what a test inspects (or attacks) the tables with."""
    connection = await asyncpg.connect(with_database(servers.database_url, database_name(settings.database_url)))
    yield connection
    await connection.close()


class AppRunner:
    """Starts FastStream apps in the test's event loop (`await run_app(app)`) and stops them."""

    def __init__(self) -> None:
        self.tasks: dict[int, tuple[FastStream, asyncio.Task[None]]] = {}

    async def __call__(self, app: FastStream) -> None:
        task = asyncio.create_task(app.run())
        self.tasks[id(app)] = (app, task)
        # app.run() returns only on exit; wait for its broker to be running instead.
        for _ in range(200):
            if getattr(app, "running", False) or task.done():
                break
            await asyncio.sleep(0.05)
        if task.done():
            task.result()

    async def stop(self, app: FastStream) -> None:
        """Stop `app` and wait until it has: its consumers are gone, so nothing is delivered to it any more."""
        app.exit()
        _, task = self.tasks.pop(id(app))
        await asyncio.wait_for(task, 15)

    async def stop_all(self) -> None:
        for app, _ in list(self.tasks.values()):
            await self.stop(app)


@pytest.fixture
async def run_app(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AppRunner]:
    """Start FastStream apps in this event loop; every one is stopped when the test ends.

    A service whose consumer loop fails sends itself SIGTERM, and a stopping service exits the process
    when its shutdown overruns its deadline. In-process, that process is pytest: the app is left to
    stop on the signal, so the test fails on what it waited for, instead of the whole run ending.
    """
    monkeypatch.setattr(warden.service, "_arm_shutdown_deadline", lambda seconds: None)
    runner = AppRunner()
    yield runner
    await runner.stop_all()


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 15.0, interval: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value; fail with its last value after `within` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s (last value: {value!r})")
        await asyncio.sleep(interval)


REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CliResult:
    status: int
    stdout: str
    stderr: str


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that points a `warden` process at this test's servers, prefix and identities."""
    env = {
        **os.environ,
        "WARDEN_NATS_URL": settings.nats_url,
        "WARDEN_DATABASE_URL": settings.database_url,
        "WARDEN_SUBJECT_PREFIX": settings.subject_prefix,
    }
    if settings.nats_credentials_dir is not None:
        env["WARDEN_NATS_CREDENTIALS_DIR"] = str(settings.nats_credentials_dir)
    if settings.nats_seed_file is not None:
        env["WARDEN_NATS_SEED_FILE"] = str(settings.nats_seed_file)
    if settings.agents_dir is not None:
        env["WARDEN_AGENTS_DIR"] = str(settings.agents_dir)
    if settings.policy_dir is not None:
        env["WARDEN_POLICY_DIR"] = str(settings.policy_dir)
    return env


async def run_warden_cli(settings: Settings, *args: str, env: dict[str, str] | None = None) -> CliResult:
    """Run the `warden` command against this test's servers and prefix (or with just `env`); its exit
    status and output."""
    env = settings_env(settings) if env is None else env
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden.cli",
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


async def warden_cli(settings: Settings, *args: str) -> str:
    """Run the `warden` command against this test's servers and prefix; its standard output (exit 0 asserted)."""
    result = await run_warden_cli(settings, *args)
    assert result.status == 0, result.stderr[-2000:]
    return result.stdout


async def start_services(settings: Settings, log_dir: Path | None = None) -> list[asyncio.subprocess.Process]:
    """The four services, each its own process as `warden up` runs them, on `settings`' servers and prefix.

    Their logs go to `log_dir/<service>.log`, or nowhere.
    """
    from warden.stack import SERVICES  # noqa: PLC0415

    env = {**settings_env(settings), "WARDEN_LOG_LEVEL": "WARNING", "WARDEN_LOG_FORMAT": "json"}
    processes = []
    for name in SERVICES:
        log = (log_dir / f"{name}.log").open("wb") if log_dir else None
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"warden.{name}",
                cwd=REPO_ROOT,
                env=env,
                stderr=log or asyncio.subprocess.DEVNULL,
            )
        )
        if log:
            log.close()
    return processes


async def stop_services(processes: list[asyncio.subprocess.Process]) -> None:
    for process in processes:
        if process.returncode is None:
            process.terminate()
    await asyncio.gather(*(process.wait() for process in processes))
