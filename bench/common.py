"""What every benchmark shares: embedded servers per durability setting, service processes, statistics."""

import asyncio
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from faststream.nats.security import NatsNKey
from nats.aio.client import Client as NatsClient

from warden.audit_projector.install import install_database
from warden.credentials import CredentialStore, superuser
from warden.database import without_login
from warden.embedded import EmbeddedServers, die_with_parent
from warden.identity import connect_options
from warden.settings import Settings
from warden.streams import provision
from warden.subjects import Subjects
from warden.wire import connect

REPO_ROOT = Path(__file__).resolve().parents[1]
Durability = Literal["always", "interval"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of the sorted values fall (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    milliseconds = [value * 1000 for value in seconds]
    return {
        "p50_ms": round(percentile(milliseconds, 0.50), 3),
        "p99_ms": round(percentile(milliseconds, 0.99), 3),
        "p999_ms": round(percentile(milliseconds, 0.999), 3),
        "samples": len(milliseconds),
    }


class BenchServers(EmbeddedServers):
    """Embedded servers with a superuser for the benchmark's own set-up and inspection (the
    services under measurement connect as their own identities, as in production)."""

    def __init__(self, state_dir: Path, **options: Any) -> None:
        self.superuser_seed, entry = superuser(Path(state_dir) / "superuser")
        super().__init__(state_dir, extra_users=[entry], **options)

    async def _bring_up(self, *, with_postgres: bool) -> None:
        await super()._bring_up(with_postgres=with_postgres)
        _RUNNING[self.nats_url] = self


_RUNNING: dict[str, BenchServers] = {}


def superuser_seed(nats_url: str) -> Path | None:
    """A seed allowed everything on the servers at `nats_url`: the bench servers' superuser, or on
    external servers WARDEN_NATS_SEED_FILE (None: connect anonymously)."""
    if nats_url in _RUNNING:
        return _RUNNING[nats_url].superuser_seed
    named = os.environ.get("WARDEN_NATS_SEED_FILE")
    return Path(named) if named else None


def admin_broker_options(nats_url: str) -> dict[str, Any]:
    """What a FastStream broker needs to connect as `admin_connect` does, as warden.service passes a service's."""
    seed = superuser_seed(nats_url)
    if seed is None:
        return {}
    return {"security": NatsNKey(str(seed)), "inbox_prefix": connect_options(seed)["inbox_prefix"]}


async def admin_connect(nats_url: str, **options: Any) -> NatsClient:
    """A connection allowed everything, to the servers at `nats_url` (see `superuser_seed`)."""
    return await connect(nats_url, **connect_options(superuser_seed(nats_url)), **options)


@dataclass
class Installation:
    """A fresh subject prefix, its streams and its database on running servers."""

    settings: Settings
    admin_url: str

    @classmethod
    async def create(cls, nats_url: str, admin_url: str, **overrides: object) -> "Installation":
        token = uuid.uuid4().hex[:8]
        database = f"bench_{token}"
        credentials = CredentialStore(Path(tempfile.mkdtemp(prefix="warden-bench-credentials-")), f"bench{token}")
        credentials.ensure_installation()
        await _RUNNING[nats_url].authorize(admit=credentials)
        # The services log in as the installation's roles, as in production (warden.database).
        database_url = without_login(admin_url.rsplit("/", 1)[0] + f"/{database}")
        await install_database(admin_url, database_url, credentials.directory, f"bench{token}")
        settings = Settings(
            nats_url=nats_url,
            database_url=database_url,
            subject_prefix=f"bench{token}",
            log_level="WARNING",
            nats_credentials_dir=credentials.directory,
            **overrides,  # type: ignore[arg-type]
        )
        nc = await admin_connect(nats_url)
        await provision(nc.jetstream(), Subjects(settings.subject_prefix), settings.stream_replicas)
        await nc.close()
        return cls(settings, admin_url)


@asynccontextmanager
async def embedded(durability: Durability) -> AsyncIterator[tuple[str, str]]:
    """NATS (with the given fsync setting) and Postgres, in a temporary directory, for one benchmark pass."""
    state = Path(tempfile.mkdtemp(prefix=f"warden-bench-{durability}-"))
    servers = BenchServers(state, sync=durability)
    endpoints = await servers.start()
    try:
        yield endpoints.nats_url, servers.admin_database_url("postgres")
    finally:
        await servers.stop()


@dataclass
class ServiceProcesses:
    """Warden services as separate processes, as in production: the benchmark measures them all."""

    settings: Settings
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    # Set in every service's environment over the rest: what one workload needs (an agents
    # directory, a model endpoint), without changing the others'.
    extra_env: Mapping[str, str] = field(default_factory=dict)

    async def start(self, *names: str) -> None:
        env = {
            **os.environ,
            "WARDEN_NATS_URL": self.settings.nats_url,
            "WARDEN_DATABASE_URL": self.settings.database_url,
            "WARDEN_SUBJECT_PREFIX": self.settings.subject_prefix,
            "WARDEN_NATS_CREDENTIALS_DIR": str(self.settings.nats_credentials_dir),
            "WARDEN_LOG_LEVEL": "WARNING",
            "WARDEN_TENANT_CONCURRENCY": str(self.settings.tenant_concurrency),
            "WARDEN_RUNNER_CONCURRENCY": str(self.settings.runner_concurrency),
            **self.extra_env,
        }
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        env.pop("WARDEN_NATS_SEED_FILE", None)  # each service connects as its own identity
        for name in names:
            label = name if name not in self.processes else f"{name}#{len(self.processes)}"
            self.processes[label] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"warden.{name}",
                cwd=REPO_ROOT,
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    def resident_mb(self) -> dict[str, float]:
        sizes = {}
        for label, process in self.processes.items():
            try:
                sizes[label] = round(psutil.Process(process.pid).memory_info().rss / 2**20, 1)
            except psutil.NoSuchProcess:
                sizes[label] = float("nan")
        return sizes

    async def stop(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.terminate()
        await asyncio.gather(*(process.wait() for process in self.processes.values()))


class CpuMeter:
    """CPU seconds each role on this machine spends between `start` and `stop`.

    Roles: each Warden service (by its `-m warden.<name>` command line; instances of one service
    add up), nats-server, Postgres (every backend) and this process (the load generator). Other
    servers of those names on the machine count too: keep them idle. Processes are read at both
    ends, so stop while the services still run.
    """

    def __init__(self) -> None:
        self._started: dict[int, tuple[str, float]] = {}

    @staticmethod
    def _role(process: psutil.Process) -> str | None:
        if process.pid == os.getpid():
            return "load generator"
        command = " ".join(process.cmdline())
        if "-m warden." in command:
            return command.split("-m warden.", 1)[1].split()[0]
        if process.name() == "nats-server":
            return "nats-server"
        if process.name().startswith("postgres"):
            return "postgres"
        return None

    @classmethod
    def _read(cls) -> dict[int, tuple[str, float]]:
        readings = {}
        for process in psutil.process_iter():
            try:
                role = cls._role(process)
                if role is not None:
                    times = process.cpu_times()
                    readings[process.pid] = (role, times.user + times.system)
            except psutil.Error:
                continue  # gone, or not ours to read
        return readings

    def start(self) -> None:
        self._started = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per role since `start` (processes that started meanwhile count from zero)."""
        spent: dict[str, float] = {}
        for pid, (role, cpu) in self._read().items():
            spent[role] = spent.get(role, 0.0) + cpu - self._started.get(pid, (role, 0.0))[1]
        return dict(sorted(spent.items(), key=lambda item: -item[1]))
