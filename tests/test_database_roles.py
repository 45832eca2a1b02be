"""Postgres least privilege: each process logs in as its installation role, and the server refuses the rest.

The projector appends to `events` and can do nothing else to it: no UPDATE, DELETE or TRUNCATE, no
altering, disabling or dropping its triggers, no tables of its own, no server programs. Readers
(the CLI, the timeline) only read. The owner, which no service runs as, is held by the triggers.
Every refusal here comes from Postgres itself.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Servers, eventually, run_warden_cli, start_services, stop_services, warden_cli
from warden.audit_projector.store import AUDIT_TABLES
from warden.database import DatabaseRole, database_name, role_name, with_login
from warden.settings import Settings

INSERT_EVENT = (
    "INSERT INTO events (stream, stream_seq, nats_subject, stored_at, tenant) VALUES ('S', $1, 'x', now(), 't')"
)


@pytest.fixture
async def as_role(settings: Settings) -> AsyncIterator[dict[DatabaseRole, asyncpg.Connection]]:
    connections = {role: await asyncpg.connect(settings.database_url_for(role)) for role in DatabaseRole}
    yield connections
    for connection in connections.values():
        await connection.close()


async def refused(connection: asyncpg.Connection, statement: str, *args: object) -> str:
    """The error Postgres answers `statement` with (the test fails if it is carried out)."""
    with pytest.raises(asyncpg.PostgresError) as refusal:
        await connection.execute(statement, *args)
    return f"{type(refusal.value).__name__}: {refusal.value}"


async def test_the_projector_appends_to_events_and_can_change_nothing_in_it(
    as_role: dict[DatabaseRole, asyncpg.Connection],
) -> None:
    projector = as_role[DatabaseRole.PROJECTOR]
    await projector.execute(INSERT_EVENT, 1)
    assert await projector.fetchval("SELECT count(*) FROM events") == 1
    for statement in (
        "UPDATE events SET tenant = 'other'",
        "DELETE FROM events",
        "TRUNCATE events",
        "ALTER TABLE events DISABLE TRIGGER events_append_only",
        "ALTER TABLE events DISABLE TRIGGER ALL",
        "DROP TRIGGER events_append_only ON events",
        "CREATE OR REPLACE FUNCTION warden_events_append_only() RETURNS trigger LANGUAGE sql AS 'SELECT NULL'",
        "DROP TABLE events",
        "ALTER TABLE events OWNER TO CURRENT_USER",
        "CREATE TABLE shadow (v text)",
        "COPY events (tenant) FROM PROGRAM 'id'",
        "SET session_replication_role = replica",  # would switch every trigger off for this session
    ):
        refusal = await refused(projector, statement)
        assert "permission denied" in refusal or "must be owner" in refusal, refusal
    assert await projector.fetchval("SELECT count(*) FROM events WHERE tenant = 't'") == 1


async def test_the_projector_only_adds_dead_letters(as_role: dict[DatabaseRole, asyncpg.Connection]) -> None:
    """A dead letter, once recorded, cannot be rewritten or removed by the projector that wrote it."""
    projector = as_role[DatabaseRole.PROJECTOR]
    await projector.execute(
        "INSERT INTO dead_letters (stream, stream_seq, consumer, reason) VALUES ('S', 1, 'c', 'gave up')"
    )
    for statement in ("UPDATE dead_letters SET reason = 'fine'", "DELETE FROM dead_letters", "TRUNCATE dead_letters"):
        assert "permission denied" in await refused(projector, statement), statement
    assert await as_role[DatabaseRole.READER].fetchval("SELECT reason FROM dead_letters") == "gave up"


async def test_no_installation_role_is_a_superuser_or_owns_the_schema(
    settings: Settings, as_role: dict[DatabaseRole, asyncpg.Connection]
) -> None:
    database = database_name(settings.database_url)
    for role, connection in as_role.items():
        login = await connection.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        assert login is not None
        assert dict(login) == dict.fromkeys(login.keys(), False), role
        assert await connection.fetchval("SELECT current_user") == role_name(database, role)
        schema_owner = await connection.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'"
        )
        assert schema_owner != role_name(database, role)
    tables = await as_role[DatabaseRole.READER].fetch(
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
    )
    assert {row["tableowner"] for row in tables} == {role_name(database, DatabaseRole.OWNER)}
    assert {row["tablename"] for row in tables} == set(AUDIT_TABLES), "the grants cover every table there is"


async def test_readers_only_read(as_role: dict[DatabaseRole, asyncpg.Connection]) -> None:
    await as_role[DatabaseRole.PROJECTOR].execute(INSERT_EVENT, 1)
    reader = as_role[DatabaseRole.READER]
    assert await reader.fetchval("SELECT count(*) FROM events") == 1
    for statement in (
        "INSERT INTO events (stream, stream_seq, nats_subject, stored_at, tenant) VALUES ('S', 2, 'x', now(), 't')",
        "UPDATE runs SET status = 'succeeded'",
        "DELETE FROM decisions",
        "UPDATE projector_positions SET last_seq = 0",
        "TRUNCATE tool_calls",
        "CREATE TABLE scratch (v text)",
    ):
        assert "permission denied" in await refused(reader, statement), statement


async def test_even_the_owner_cannot_truncate_update_or_delete_events(
    as_role: dict[DatabaseRole, asyncpg.Connection],
) -> None:
    await as_role[DatabaseRole.PROJECTOR].execute(INSERT_EVENT, 1)
    owner = as_role[DatabaseRole.OWNER]
    for statement in ("UPDATE events SET tenant = 'other'", "DELETE FROM events", "TRUNCATE events"):
        assert "append-only" in await refused(owner, statement), statement
    assert "permission denied" in await refused(owner, "COPY events (tenant) FROM PROGRAM 'id'")


async def test_a_role_without_its_password_is_refused(settings: Settings) -> None:
    database = database_name(settings.database_url)
    for role in DatabaseRole:
        for password in (None, "guess"):
            url = with_login(settings.database_url, role_name(database, role), password)
            with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
                await asyncpg.connect(url)


async def test_running_services_and_the_cli_log_in_as_their_roles_never_a_superuser(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """While the four services run a governed run and the CLI reads it back, every session on the
    installation's database is one of its roles, and the projector's is the projector role."""
    database = database_name(settings.database_url)
    sessions = (
        "SELECT DISTINCT a.usename, r.rolsuper FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename "
        "WHERE a.datname = $1 AND a.pid <> pg_backend_pid()"
    )
    processes = await start_services(settings)
    try:
        seen: set[tuple[str, bool]] = set()

        async def projector_connected() -> bool:
            seen.update((row["usename"], row["rolsuper"]) for row in await db.fetch(sessions, database))
            return any(name == role_name(database, DatabaseRole.PROJECTOR) for name, _ in seen)

        await eventually(projector_connected, within=30)
        submitted = await warden_cli(settings, "submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice")
        run_id = json.loads(submitted)["run_id"]

        async def finished() -> bool:
            status: str | None = await db.fetchval("SELECT status FROM runs WHERE run_id = $1", run_id)
            return status == "succeeded"

        await eventually(finished, within=60)
        cli = asyncio.create_task(warden_cli(settings, "runs", "--run", run_id))
        while not cli.done():
            seen.update((row["usename"], row["rolsuper"]) for row in await db.fetch(sessions, database))
            await asyncio.sleep(0.01)
        assert "run SUCCEEDED" in cli.result()  # read as the reader role: the URL names no user
    finally:
        await stop_services(processes)
    installation = {role_name(database, role) for role in DatabaseRole}
    assert {name for name, _ in seen} <= installation, seen
    assert not any(superuser for _, superuser in seen), seen


async def test_installing_with_a_wrong_admin_password_says_so(
    servers: Servers, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "admin.password").write_text("not-the-password\n")
    result = await run_warden_cli(
        settings,
        *("database", "install", "--admin-url", with_login(servers.database_url, "postgres", None)),
        *("--admin-password-file", str(tmp_path / "admin.password"), "--dir", str(tmp_path / "credentials")),
    )
    assert result.status == 1, result.stderr
    assert "Postgres refused the installation (InvalidPasswordError)" in result.stderr
    assert "Traceback" not in result.stderr
