"""Tests for the embedded NATS JetStream and PostgreSQL servers in warden.embedded."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import nats
import psutil
import pytest

from tests.conftest import Servers
from warden import embedded
from warden.database import SUPERUSER_PASSWORD_FILE, without_login
from warden.embedded import NATS_CONFIGS, EmbeddedServers, nats_server_binary
from warden.endpoints import credentials_dir
from warden.identity import connect_options
from warden.permissions import Role


def _varz(servers: EmbeddedServers) -> dict[str, Any]:
    with urllib.request.urlopen(f"{servers.nats_monitor_url}/varz", timeout=5) as response:
        varz: dict[str, Any] = json.load(response)
        return varz


async def test_start_serves_jetstream_and_postgres(tmp_path: Path) -> None:
    """A started stack answers JetStream API calls and SQL on the application database."""
    servers = EmbeddedServers(tmp_path / "state")
    async with servers as endpoints:
        assert endpoints.nats_url.startswith("nats://127.0.0.1:")
        assert endpoints.database_url.startswith("postgresql://127.0.0.1:")  # no login: each role adds its own
        assert endpoints.database_url.endswith("/warden")
        assert endpoints.state_dir == (tmp_path / "state").resolve()
        assert (tmp_path / "state" / "postgres" / "PG_VERSION").exists()
        assert (tmp_path / "state" / "nats" / "jetstream").is_dir()

        nc = await nats.connect(endpoints.nats_url, **connect_options(servers.credentials.seed_file(Role.PROVISIONER)))
        try:
            info = await nc.jetstream().account_info()
            assert info.api.errors == 0
        finally:
            await nc.close()

        conn = await asyncpg.connect(endpoints.admin_database_url)
        try:
            assert await conn.fetchval("select 1") == 1
            assert await conn.fetchval("select current_database()") == "warden"
        finally:
            await conn.close()

        admin = await asyncpg.connect(servers.admin_database_url())
        try:
            assert await admin.fetchval("select current_database()") == "postgres"
        finally:
            await admin.close()
    await servers.stop()  # a second stop is a no-op


async def test_postgres_asks_everyone_for_a_password(tmp_path: Path) -> None:
    """No `trust`: without the password, or with a wrong one, Postgres refuses, by TCP and by its socket."""
    servers = EmbeddedServers(tmp_path / "state")
    async with servers as endpoints:
        port = urlsplit(endpoints.database_url).port
        socket_dir = tmp_path / "state" / "postgres"
        attempts: list[dict[str, Any]] = [
            {"host": "127.0.0.1", "port": port, "user": "postgres"},
            {"host": "127.0.0.1", "port": port, "user": "postgres", "password": "guess"},
            {"host": str(socket_dir), "port": port, "user": "postgres"},
        ]
        for attempt in attempts:
            with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
                await asyncpg.connect(database="warden", **attempt)
        password_file = servers.credentials.directory / SUPERUSER_PASSWORD_FILE
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600


async def test_data_from_a_trusting_version_gets_passwords_on_start(tmp_path: Path) -> None:
    """Data made when Postgres trusted loopback is switched to passwords on the next start, rows kept."""
    state = tmp_path / "state"
    async with EmbeddedServers(state) as endpoints:
        conn = await asyncpg.connect(endpoints.admin_database_url)
        await conn.execute("create table kept (v text); insert into kept values ('row')")
        await conn.close()
    # As an earlier Warden left it: trust everywhere, no password file.
    (state / "postgres" / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    (credentials_dir(state) / SUPERUSER_PASSWORD_FILE).unlink()

    async with EmbeddedServers(state) as endpoints:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(without_login(endpoints.admin_database_url), user="postgres")
        conn = await asyncpg.connect(endpoints.admin_database_url)
        try:
            assert await conn.fetchval("select v from kept") == "row"
        finally:
            await conn.close()


async def test_restart_reuses_stored_data(tmp_path: Path, servers: Servers) -> None:
    """A second start on the same state dir sees the streams, messages and tables of the first."""
    superuser = servers.superuser_entry()
    embedded = EmbeddedServers(tmp_path, extra_users=[superuser])
    endpoints = await embedded.start()
    try:
        nc = await nats.connect(endpoints.nats_url, **servers.superuser())
        js = nc.jetstream()
        await js.add_stream(name="EMBEDDED_TEST", subjects=["embedded.test"])
        await js.publish("embedded.test", b"kept")
        await nc.close()
        conn = await asyncpg.connect(endpoints.admin_database_url)
        await conn.execute("create table kept (v text); insert into kept values ('row')")
        await conn.close()
    finally:
        await embedded.stop()

    async with EmbeddedServers(tmp_path, extra_users=[superuser]) as endpoints:
        nc = await nats.connect(endpoints.nats_url, **servers.superuser())
        try:
            stream = await nc.jetstream().stream_info("EMBEDDED_TEST")
            assert stream.state.messages == 1
        finally:
            await nc.close()
        conn = await asyncpg.connect(endpoints.admin_database_url)
        try:
            assert await conn.fetchval("select v from kept") == "row"
        finally:
            await conn.close()


@pytest.mark.parametrize(
    ("sync", "sync_always", "sync_interval_ns"),
    [("always", True, None), ("interval", None, 120 * 10**9)],
)
async def test_nats_durability_setting_is_in_force(
    tmp_path: Path, sync: str, sync_always: bool | None, sync_interval_ns: int | None
) -> None:
    """The running nats-server reports the fsync policy, payload limit and host of the chosen config."""
    servers = EmbeddedServers(tmp_path, sync="always" if sync == "always" else "interval")
    async with servers:
        varz = _varz(servers)
    config = varz["jetstream"]["config"]
    assert config.get("sync_always") == sync_always
    if sync_interval_ns is not None:
        assert config["sync_interval"] == sync_interval_ns
    assert varz["max_payload"] == 1048576
    assert varz["host"] == "127.0.0.1"


@pytest.mark.parametrize("config", sorted(NATS_CONFIGS.values()), ids=lambda p: p.name)
def test_checked_in_nats_configs_are_valid(config: Path) -> None:
    """nats-server's own config check (-t) accepts both checked-in configs."""
    result = subprocess.run(
        [nats_server_binary(), "-c", config, "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


async def test_long_state_dir_puts_postgres_socket_elsewhere(tmp_path: Path) -> None:
    """A pgdata path too long for a Unix socket still starts, with the socket dir under /tmp."""
    state_dir = tmp_path / ("deep" * 25)
    async with EmbeddedServers(state_dir) as endpoints:
        conn = await asyncpg.connect(endpoints.admin_database_url)
        try:
            socket_dir = Path(await conn.fetchval("show unix_socket_directories"))
        finally:
            await conn.close()
        assert not socket_dir.is_relative_to(state_dir)
        assert await asyncio.to_thread(socket_dir.is_dir)
    assert not await asyncio.to_thread(socket_dir.exists)  # removed again by stop()


async def test_postgres_retries_when_port_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the chosen Postgres port is taken before postgres binds it, start retries on another."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        # the taken port first, then real picks (picking the second one up front could race)
        ports: Iterator[int] = itertools.chain([taken], iter(embedded._free_port, None))
        monkeypatch.setattr(embedded, "_free_port", lambda: next(ports))
        servers = EmbeddedServers(tmp_path)
        async with servers:
            url = servers.admin_database_url()
            assert f":{taken}/" not in url
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("show data_directory") == str((tmp_path / "postgres").resolve())
            finally:
                await conn.close()


_LAUNCHER = """
import asyncio, sys
from pathlib import Path
from warden.embedded import EmbeddedServers

async def main() -> None:
    await EmbeddedServers(Path(sys.argv[1])).start()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _gone(proc: psutil.Process) -> bool:
    # zombies count as dead: PID 1 in a container often does not reap reparented orphans
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_children_die_when_parent_is_sigkilled(tmp_path: Path) -> None:
    """SIGKILLing the launching process takes nats-server and every postgres process down with it."""
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LAUNCHER, str(tmp_path), stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    assert launcher.stdout is not None
    children: list[psutil.Process] = []
    try:
        assert await asyncio.wait_for(launcher.stdout.readline(), 60) == b"ready\n"
        children = psutil.Process(launcher.pid).children(recursive=True)
        names = {child.name() for child in children}
        assert {"nats-server", "postgres"} <= names, names
        assert any(child.username() == "pgserver" for child in children) == (os.geteuid() == 0)

        launcher.send_signal(signal.SIGKILL)
        await launcher.wait()
        for _ in range(100):  # up to 10 s
            if all(_gone(child) for child in children):
                break
            await asyncio.sleep(0.1)
        assert [c.pid for c in children if not _gone(c)] == []
    finally:
        if launcher.returncode is None:
            launcher.kill()
            await launcher.wait()
        for child in children:
            if not _gone(child):
                child.kill()
