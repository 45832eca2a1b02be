"""Install an installation's audit database: its roles, its schema (owned by the owner role) and grants.

Run with an administrator's login (a superuser, or a role with CREATEDB and CREATEROLE) by
`warden up` and `warden database install`; never by a service. Safe to run again: it creates what
is missing, sets each role's password from its file, and grants again. See `warden.database`
for what each role may do; `schema.sql` for the tables.
"""

from collections.abc import Sequence
from pathlib import Path

import asyncpg
import structlog

from warden.admission import CommandRules
from warden.audit_projector.store import APPEND_ONLY_TABLES, READ_MODEL_TABLES, AuditStore, create_pool
from warden.database import (
    DatabaseRole,
    database_name,
    ensure_passwords,
    password_file,
    read_password,
    role_name,
    with_database,
    with_login,
)
from warden.streams import StreamNames
from warden.subjects import Subjects

log = structlog.get_logger(__name__)


async def set_password(connection: asyncpg.Connection, role: str, password: str) -> None:
    """Set `role`'s password. It travels as a bound parameter into a server-side EXECUTE, so it is
    in no statement text the server might log; Postgres keeps only its SCRAM verifier."""
    async with connection.transaction():
        # Transaction-local: the settings are gone at commit.
        await connection.execute(
            "SELECT set_config('warden.login_role', $1, true), set_config('warden.login_password', $2, true)",
            role,
            password,
        )
        await connection.execute(
            "DO $$ BEGIN EXECUTE format('ALTER ROLE %I PASSWORD %L', "
            "current_setting('warden.login_role'), current_setting('warden.login_password')); END $$"
        )


async def _set_login(admin: asyncpg.Connection, name: str, password: str) -> None:
    """Create the login role `name` unless it exists, hold it to no special right, set its password."""
    async with admin.transaction():
        verb = "ALTER" if await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name) else "CREATE"
        await admin.execute(
            f"{verb} ROLE {_ident(name)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        )
        await set_password(admin, name, password)


async def install_database(admin_url: str, database_url: str, credentials_dir: Path, prefix: str) -> None:
    """Make the database at `database_url` ready for the installation with subject prefix `prefix`.

    `admin_url` is an administrator's login to any database of the same server.
    """
    database = database_name(database_url)
    ensure_passwords(credentials_dir)
    names = {role: role_name(database, role) for role in DatabaseRole}
    admin = await asyncpg.connect(with_database(admin_url, "postgres"))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await admin.execute(f"CREATE DATABASE {_ident(database)}")
        for role, name in names.items():
            await _set_login(admin, name, read_password(password_file(credentials_dir, role)))
    finally:
        await admin.close()

    owner, projector, reader = names[DatabaseRole.OWNER], names[DatabaseRole.PROJECTOR], names[DatabaseRole.READER]
    admin = await asyncpg.connect(with_database(admin_url, database))
    try:
        await admin.execute(
            f"""
            REVOKE ALL ON DATABASE {_ident(database)} FROM PUBLIC;
            GRANT CONNECT, TEMPORARY ON DATABASE {_ident(database)} TO {_ident(owner)}, {_ident(projector)},
                {_ident(reader)};
            GRANT CREATE ON DATABASE {_ident(database)} TO {_ident(owner)};
            REVOKE ALL ON SCHEMA public FROM PUBLIC;
            GRANT USAGE, CREATE ON SCHEMA public TO {_ident(owner)};
            GRANT USAGE ON SCHEMA public TO {_ident(projector)}, {_ident(reader)};
            """
        )
        # Tables an earlier Warden made as the administrator pass to the owner role.
        for table in await admin.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tableowner <> $1", owner
        ):
            await admin.execute(f"ALTER TABLE public.{_ident(table['tablename'])} OWNER TO {_ident(owner)}")
        if await admin.fetchval("SELECT to_regproc('public.warden_events_append_only') IS NOT NULL"):
            await admin.execute(f"ALTER FUNCTION public.warden_events_append_only() OWNER TO {_ident(owner)}")
    finally:
        await admin.close()

    owner_url = with_login(database_url, owner, read_password(password_file(credentials_dir, DatabaseRole.OWNER)))
    pool = await create_pool(owner_url, size=1)
    try:
        streams = StreamNames.for_prefix(prefix)
        # The store only creates tables here: its admission rules never judge a command.
        store = AuditStore(pool, CommandRules(Subjects(prefix), max_bytes=0))
        await store.ensure_schema(list(streams.audited))
        await pool.execute(
            f"""
            GRANT SELECT, INSERT ON {", ".join(APPEND_ONLY_TABLES)} TO {_ident(projector)};
            -- Earlier versions let the projector update dead letters; nothing it does needs to.
            REVOKE UPDATE ON dead_letters FROM {_ident(projector)};
            GRANT SELECT, INSERT, UPDATE ON {", ".join(READ_MODEL_TABLES)} TO {_ident(projector)};
            GRANT SELECT ON ALL TABLES IN SCHEMA public TO {_ident(reader)};
            """
        )
    finally:
        await pool.close()
    log.info("audit database installed", database=database, roles=sorted(names.values()))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def drop_roles(admin_url: str, database: str, roles: Sequence[DatabaseRole] = tuple(DatabaseRole)) -> None:
    """Drop an installation's roles (after its database is dropped): for test suites and benchmarks."""
    admin = await asyncpg.connect(with_database(admin_url, "postgres"))
    try:
        for role in roles:
            await admin.execute(f"DROP ROLE IF EXISTS {_ident(role_name(database, role))}")
    finally:
        await admin.close()
