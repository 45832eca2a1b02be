"""Who connects to Postgres as whom: an installation's three database roles, and each one's login.

One installation has one database and three roles, named after it (`<database>_<role>`):

- owner: owns the tables and the append-only trigger; installs and migrates the schema, and
  replays the audit into new schemas. No service runs as it.
- projector: the audit projector. Appends to `events` (INSERT and SELECT only: no UPDATE,
  DELETE or TRUNCATE), maintains the read-model tables; owns nothing, so it cannot alter or
  disable a trigger.
- reader: the CLI and the timeline. SELECT only.

Their passwords are files in the installation's credentials directory (`postgres-<role>.password`,
mode 600), written once by `warden up` or `warden credentials init`. A process asks for the login
of its role: a database URL without a user name becomes that role's user and password; a URL that
names a user is taken as given (an external server whose logins someone else manages: libpq's
PGPASSWORD and ~/.pgpass work as usual).

This module reads files only: a client install needs neither asyncpg nor a server.
"""

from __future__ import annotations

import enum
import os
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit


class DatabaseRole(enum.StrEnum):
    OWNER = "owner"
    PROJECTOR = "projector"
    READER = "reader"


SUPERUSER_PASSWORD_FILE = "postgres-superuser.password"


def password_file_name(role: DatabaseRole) -> str:
    return f"postgres-{role.value}.password"


def password_file(credentials_dir: Path, role: DatabaseRole) -> Path:
    return credentials_dir / password_file_name(role)


def database_name(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not name:
        raise ValueError(f"the database URL names no database: {redacted(url)}")
    return name


def role_name(database: str, role: DatabaseRole) -> str:
    """The Postgres role of `role` for the installation whose database is `database`."""
    return f"{database}_{role.value}"


def write_new_password(path: Path) -> bool:
    """Create a random password file (mode 600 from the first byte) unless one exists; True if made."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(secrets.token_urlsafe(32) + "\n")
    return True


def ensure_passwords(credentials_dir: Path) -> None:
    """Create the password file of each role that has none (kept beside the installation's NATS seeds)."""
    credentials_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for role in DatabaseRole:
        write_new_password(password_file(credentials_dir, role))


def read_password(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def with_login(url: str, user: str, password: str | None) -> str:
    """`url` with `user` (and `password`) as its login."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    login = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def with_database(url: str, database: str) -> str:
    """`url`, naming another database on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def without_login(url: str) -> str:
    """`url` with no user or password: each process then logs in as its own role."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def login_url(url: str, credentials_dir: Path | None, role: DatabaseRole) -> str:
    """The URL a process in `role` connects with (see the module's docstring)."""
    if urlsplit(url).username:
        return url
    if credentials_dir is not None:
        secret = password_file(credentials_dir, role)
        if secret.exists():
            return with_login(url, role_name(database_name(url), role), read_password(secret))
    return url


def redacted(url: str) -> str:
    """`url` without its password: what may be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(parts.username or '', safe='')}:***@{host}"))
