"""`warden up`: the whole control plane on one machine, with real NATS and Postgres, no Docker."""

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from warden.audit_projector.install import install_database
from warden.bus import retry_transient
from warden.credentials import private_credentials
from warden.database import redacted
from warden.embedded import EmbeddedServers, die_with_parent
from warden.endpoints import hold_state_dir, remove_endpoints, write_endpoints
from warden.errors import WardenError
from warden.identity import connect_options
from warden.offline_model import OfflineModelServer
from warden.permissions import Role
from warden.settings import Settings
from warden.streams import StreamNames, provision
from warden.subjects import Subjects
from warden.wire import connect

log = structlog.get_logger(__name__)

# Each is `python -m warden.<name>`, its own process.
SERVICES = ("audit_projector", "policy_gate", "scheduler", "agent_runner")
RESTART_DELAY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)
# A service that ran this long before it exited counts as healthy again: its next restart is quick.
HEALTHY_AFTER_SECONDS = 60.0


@dataclass
class ServiceProcess:
    """One supervised service: restarted with backoff if it exits while the stack is up."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    restarts: int = field(default=0)

    async def start(self) -> None:
        log_file = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"warden.{self.name}",
            env=self.env,
            stdout=log_file,
            stderr=log_file,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        log_file.close()

    async def stop(self, grace_seconds: float = 10.0) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), grace_seconds)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def _own_credentials(settings: Settings, state_dir: Path, service: str) -> dict[str, str]:
    """The environment that gives `service` a credentials directory of its own: its identity's seed
    and the keys or password its work needs, none of another's (warden.credentials.SERVICE_SECRETS)."""
    if settings.nats_credentials_dir is None:
        return {}
    role = Role(service.replace("_", "-"))
    private = private_credentials(settings.nats_credentials_dir, role, state_dir / "run" / "credentials" / service)
    return {"WARDEN_NATS_CREDENTIALS_DIR": str(private)}


async def _supervise(service: ServiceProcess, stopping: asyncio.Event) -> None:
    """Wait on a started service; restart it with backoff whenever it exits before the stack stops."""
    while not stopping.is_set():
        if service.process is None or service.process.returncode is not None:
            await service.start()
        assert service.process is not None
        started = asyncio.get_running_loop().time()
        wait_exit = asyncio.create_task(service.process.wait())
        wait_stop = asyncio.create_task(stopping.wait())
        await asyncio.wait({wait_exit, wait_stop}, return_when=asyncio.FIRST_COMPLETED)
        wait_stop.cancel()
        if stopping.is_set():
            wait_exit.cancel()
            return
        if asyncio.get_running_loop().time() - started >= HEALTHY_AFTER_SECONDS:
            service.restarts = 0  # it was healthy: one crash now is not the fifth in a row
        delay = RESTART_DELAY_SECONDS[min(service.restarts, len(RESTART_DELAY_SECONDS) - 1)]
        service.restarts += 1
        log.error(
            "service exited; restarting",
            service=service.name,
            code=service.process.returncode,
            retry_in_s=delay,
            log=str(service.log_path),
        )
        await asyncio.sleep(delay)
        service.process = None


async def _bring_up_servers(servers: EmbeddedServers | None, settings: Settings) -> Settings:
    """Start the embedded servers (None: external ones) and install the audit database; the
    settings that point at them."""
    if servers is not None:
        endpoints = await servers.start()
        settings = settings.model_copy(
            update={
                "nats_url": endpoints.nats_url,
                "database_url": endpoints.database_url,
                "nats_credentials_dir": servers.credentials.directory,
            }
        )
        # Roles, tables and grants: idempotent, and how an upgrade reaches the schema.
        admin_url, credentials = endpoints.admin_database_url, servers.credentials.directory
    elif admin_url := os.environ.get("WARDEN_DATABASE_ADMIN_URL", ""):
        if settings.nats_credentials_dir is None:
            raise WardenError("WARDEN_DATABASE_ADMIN_URL needs WARDEN_NATS_CREDENTIALS_DIR: where roles' passwords go")
        credentials = settings.nats_credentials_dir
    else:
        return settings  # an external database someone else installed (`warden database install`)
    await install_database(admin_url, settings.database_url, credentials, settings.subject_prefix)
    return settings


# Where the shipped `assistant` agent finds its model (see agents/assistant.json).
ASSISTANT_BASE_URL = "WARDEN_ASSISTANT_BASE_URL"


def _logs_dir(state_dir: Path) -> Path:
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    return logs


async def _assistant_model() -> OfflineModelServer | None:
    """The shipped `assistant` agent needs a model: with none named, the offline test model serves
    it, so the stack governs an `llm` agent with no network and no key."""
    if os.environ.get(ASSISTANT_BASE_URL):
        return None
    server = OfflineModelServer()
    await server.start()
    return server


async def run_stack(
    settings: Settings,
    *,
    sync: str = "always",
    nats_nodes: int = 1,
    ready: asyncio.Event | None = None,
    announce: bool = True,
) -> None:
    """Start (or reuse) the servers, provision, run the services until SIGINT or SIGTERM, stop it all.

    `announce` prints where everything is and how to use it (not wanted by a caller, like the demo,
    that runs the stack only for a moment).
    """
    state_dir = settings.state_dir.resolve()
    # Before anything else: a second `warden up` here must not touch the running stack's servers or files.
    lock = hold_state_dir(state_dir)
    external = "WARDEN_NATS_URL" in os.environ and "WARDEN_DATABASE_URL" in os.environ
    servers = None
    if not external:
        servers = EmbeddedServers(
            state_dir,
            sync="interval" if sync == "interval" else "always",
            nats_nodes=3 if nats_nodes == 3 else 1,
            subject_prefix=settings.subject_prefix,
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    services: list[ServiceProcess] = []
    supervisors: list[asyncio.Task[None]] = []
    model_server: OfflineModelServer | None = None
    try:
        settings = await _bring_up_servers(servers, settings)
        nc = await connect(settings.nats_url, **connect_options(settings.seed_file_for(Role.PROVISIONER)))
        try:
            # A cluster's third node may join its meta group a moment after JetStream first answers.
            provisioned = await retry_transient(
                lambda: provision(nc.jetstream(), Subjects(settings.subject_prefix), settings.stream_replicas),
                what="provisioning",
            )
        finally:
            await nc.close()

        model_server = await _assistant_model()
        env = {
            **os.environ,
            **({ASSISTANT_BASE_URL: model_server.base_url} if model_server else {}),
            "WARDEN_NATS_URL": settings.nats_url,
            "WARDEN_DATABASE_URL": settings.database_url,
            "WARDEN_SUBJECT_PREFIX": settings.subject_prefix,
            "WARDEN_LOG_FORMAT": "json",
        }
        logs = _logs_dir(state_dir)
        services = [
            ServiceProcess(name, {**env, **_own_credentials(settings, state_dir, name)}, logs / f"{name}.log")
            for name in SERVICES
        ]
        for service in services:
            await service.start()
        supervisors = [asyncio.create_task(_supervise(service, stopping)) for service in services]
        if servers is not None:
            supervisors.append(asyncio.create_task(servers.supervise(stopping)))
        write_endpoints(state_dir, settings.nats_url, settings.database_url)
        if announce:
            _print_summary(settings, state_dir, external, provisioned.lines(), services, model=model_server)
        if ready is not None:
            ready.set()
        await stopping.wait()
    finally:
        if announce:
            print("warden: stopping ...", file=sys.stderr)
        stopping.set()
        await asyncio.gather(*supervisors, return_exceptions=True)
        await asyncio.gather(*(service.stop() for service in reversed(services)))
        remove_endpoints(state_dir)
        if model_server is not None:
            await model_server.stop()
        if servers is not None:
            await servers.stop()
        lock.close()
        if announce:
            print("warden: stopped", file=sys.stderr)


def _print_summary(
    settings: Settings,
    state_dir: Path,
    external: bool,
    changes: list[str],
    services: list[ServiceProcess],
    *,
    model: OfflineModelServer | None,
) -> None:
    streams = StreamNames.for_prefix(settings.subject_prefix)
    origin = "external (WARDEN_NATS_URL, WARDEN_DATABASE_URL)" if external else f"embedded, data in {state_dir}"
    lines = [
        "Warden is up.",
        f"  servers:   {origin}",
        f"  NATS:      {settings.nats_url}",
        f"  Postgres:  {redacted(settings.database_url)} (services log in as their own roles)",
        f"  streams:   {', '.join(streams.installation)}" + (f"  ({'; '.join(changes)})" if changes else ""),
        f"  subjects:  {settings.subject_prefix}.cmd.<tenant>.<actor>.<type>, {settings.subject_prefix}.evt.<tenant>.>",
        *(f"  service:   {s.name} (pid {s.process.pid if s.process else '?'}), log {s.log_path}" for s in services),
        f"  identities: {settings.nats_credentials_dir} (NATS refuses any other; this machine's CLI is the operator)"
        if settings.nats_credentials_dir
        else "  identities: given by WARDEN_NATS_CREDENTIALS_DIR / WARDEN_NATS_SEED_FILE",
        f"  model:     offline test model at {model.base_url} (set {ASSISTANT_BASE_URL} for a real one)"
        if model
        else f"  model:     {os.environ.get(ASSISTANT_BASE_URL)} ({ASSISTANT_BASE_URL})",
        "Try: uv run warden submit --tenant acme --agent demo --actor alice ; uv run warden tail --tenant acme",
        "A tenant's own credential: uv run warden credentials issue --tenant acme --actor alice",
        "Press Ctrl-C to stop everything.",
    ]
    print("\n".join(lines), flush=True)
