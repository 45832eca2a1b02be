"""An installation's NATS identities, kept as NKey seed files, and the server authorization made from them.

Layout of a credentials directory (mode 700; every seed file mode 600):

    installation.json           the subject prefix these identities are for
    provisioner.nk ... operator.nk   one seed per installation role (warden.permissions.Role)
    decision-signing.key, decision-keys.pub   the gate's signing key, the keys runners trust
    checkpoint-signing.key, checkpoint-keys.pub   the audit projector's checkpoint key, its public half
    evidence-signing.key, evidence-keys.pub   the operator's key for evidence bundles, its public half
    postgres-<role>.password    the database roles' passwords (warden.database)
    tenants/<tenant>/<actor>.nk      tenants' client credentials, issued on demand

The server never sees a seed: its configuration lists public keys and each one's permissions
(`authorization_config`). Issuing or revoking a credential rewrites that list; the server reads it
again on a reload signal, with no restart and no dropped connection.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nkeys

from warden.database import DatabaseRole, ensure_passwords, password_file_name
from warden.errors import WardenError
from warden.identity import SEED_SUFFIX, public_key, read_seed
from warden.permissions import INSTALLATION_ROLES, Role, service_permissions, tenant_permissions
from warden.signing import (
    CHECKPOINT_KEY_FILE,
    CHECKPOINT_KEYS_FILE,
    SIGNING_KEY_FILE,
    TRUSTED_KEYS_FILE,
    create_checkpoint_key,
    create_evidence_key,
    create_signing_key,
)
from warden.subjects import Subjects

INSTALLATION_FILE = "installation.json"
# Where a server's list of identities is written: beside the embedded stack's configuration, or
# beside the credentials for a server someone else runs.
AUTHORIZATION_FILE = "authorization.conf"
TENANTS_DIR = "tenants"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CredentialStoreError(WardenError):
    """A credentials directory that belongs to another installation, or a name that cannot be a credential."""


@dataclass(frozen=True)
class Identity:
    """One NATS user: who it is, its public key, and where its seed is kept."""

    role: Role
    public_key: str
    seed_file: Path
    tenant: str | None = None
    actor: str | None = None

    @property
    def description(self) -> str:
        return f"tenant {self.tenant}, actor {self.actor}" if self.role is Role.TENANT else self.role.value


def _write_new_seed(path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    for directory in reversed(path.parents):  # each level made private (mkdir's mode covers the last only)
        if not directory.exists():
            directory.mkdir(mode=0o700)
    # O_EXCL: never overwrite a key that may already be in use; 0600 from the first byte written.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(seed + b"\n")


def _checked_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise CredentialStoreError(f"{what} {value!r} must be 1-64 letters, digits, '_' or '-'")
    return value


class CredentialStore:
    """The identities of one installation (one subject prefix), under one directory."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = Path(directory)
        self.subjects = Subjects(prefix)

    def _claim(self) -> None:
        """Create the directory for this prefix, or check that it is this prefix's."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = self.directory / INSTALLATION_FILE
        if marker.exists():
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("subject_prefix")
            if recorded != self.subjects.prefix:
                raise CredentialStoreError(
                    f"{self.directory} holds the credentials of subject prefix {recorded!r}, "
                    f"not {self.subjects.prefix!r}"
                )
        else:
            marker.write_text(json.dumps({"subject_prefix": self.subjects.prefix}) + "\n", encoding="utf-8")

    def seed_file(self, role: Role) -> Path:
        return self.directory / f"{role.value}{SEED_SUFFIX}"

    def tenant_seed_file(self, tenant: str, actor: str) -> Path:
        tenant, actor = _checked_name(tenant, "tenant"), _checked_name(actor, "actor")
        return self.directory / TENANTS_DIR / tenant / f"{actor}{SEED_SUFFIX}"

    def ensure_installation(self) -> list[Identity]:
        """Create whichever of the installation's identities do not exist yet; keep the others."""
        self._claim()
        for role in INSTALLATION_ROLES:
            if not self.seed_file(role).exists():
                _write_new_seed(self.seed_file(role))
        create_signing_key(self.directory)
        create_checkpoint_key(self.directory)
        # Here too for an installation made before evidence bundles were signed: `warden up` and
        # `credentials init` both come through here, so its next start adds the missing key.
        create_evidence_key(self.directory)
        ensure_passwords(self.directory)
        return self.identities()

    def issue(self, tenant: str, actor: str) -> Identity:
        """A new client credential for `actor` of `tenant` (refused if that actor already has one)."""
        self._claim()
        seed_file = self.tenant_seed_file(tenant, actor)
        if seed_file.exists():
            raise CredentialStoreError(
                f"{actor!r} of tenant {tenant!r} already has a credential ({seed_file}); revoke it first"
            )
        _write_new_seed(seed_file)
        return self._identity(Role.TENANT, seed_file, tenant, actor)

    def revoke(self, tenant: str, actor: str) -> Identity:
        """Delete a tenant credential; the server refuses it from its next reload on."""
        seed_file = self.tenant_seed_file(tenant, actor)
        if not seed_file.exists():
            raise CredentialStoreError(f"{actor!r} of tenant {tenant!r} has no credential here")
        identity = self._identity(Role.TENANT, seed_file, tenant, actor)
        seed_file.unlink()
        return identity

    def identities(self) -> list[Identity]:
        found = [
            self._identity(role, self.seed_file(role)) for role in INSTALLATION_ROLES if self.seed_file(role).exists()
        ]
        for seed_file in sorted((self.directory / TENANTS_DIR).glob(f"*/*{SEED_SUFFIX}")):
            found.append(self._identity(Role.TENANT, seed_file, seed_file.parent.name, seed_file.stem))
        return found

    @staticmethod
    def _identity(role: Role, seed_file: Path, tenant: str | None = None, actor: str | None = None) -> Identity:
        return Identity(role, public_key(read_seed(seed_file)), seed_file, tenant, actor)

    def users(self) -> list[dict[str, object]]:
        """The nats-server `users` entries of every identity here: public key and permissions."""
        users: list[dict[str, object]] = []
        for identity in self.identities():
            if identity.role is Role.TENANT:
                assert identity.tenant is not None
                assert identity.actor is not None
                permissions = tenant_permissions(identity.tenant, identity.actor, self.subjects, identity.public_key)
            else:
                permissions = service_permissions(identity.role, self.subjects, identity.public_key)
            users.append({"nkey": identity.public_key, "permissions": permissions.as_nats()})
        return users


# What each service needs of the credentials directory, and nothing more: its own seed, and the
# gate's signing key (and the trusted keys, to check the decision an approval request carries),
# the runners' and the scheduler's trusted keys (the scheduler obeys only signed cancels and
# halts), the projector's database password and its checkpoint key. The provisioner (`warden
# provision`, which creates the streams) needs its seed alone. No service gets the evidence key
# (evidence-signing.key): it is the operator's, who signs what `warden audit export` writes, and
# a service holding it could vouch for a bundle it made up.
SERVICE_SECRETS: dict[Role, tuple[str, ...]] = {
    Role.PROVISIONER: (),
    Role.POLICY_GATE: (SIGNING_KEY_FILE, TRUSTED_KEYS_FILE),
    Role.SCHEDULER: (TRUSTED_KEYS_FILE,),
    Role.AGENT_RUNNER: (TRUSTED_KEYS_FILE,),
    Role.AUDIT_PROJECTOR: (password_file_name(DatabaseRole.PROJECTOR), CHECKPOINT_KEY_FILE, CHECKPOINT_KEYS_FILE),
}


def private_credentials(source: Path, role: Role, target: Path) -> Path:
    """A directory holding only what `role` needs of `source` (see SERVICE_SECRETS), copied afresh.

    A service given this directory instead of the installation's cannot read another identity's
    seed, the operator's, or another role's password: a compromised service is that service only.
    The seed must be there; a key or password `source` does not hold is left out (the service then
    goes without, as it would beside `source`: a database URL naming its own login, say).
    """
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)
    seed = f"{role.value}{SEED_SUFFIX}"
    if not (source / seed).exists():
        raise CredentialStoreError(f"{source} holds no identity for {role.value} ({seed})")
    wanted = {seed, *(name for name in SERVICE_SECRETS[role] if (source / name).exists())}
    for stale in target.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for name in sorted(wanted):
        staged = target / f".{name}.tmp"
        staged.unlink(missing_ok=True)
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write((source / name).read_bytes())
        staged.replace(target / name)
    return target


def hand_out(source: Path, into: Path) -> dict[Role, Path]:
    """A directory of its own under `into` for each role of SERVICE_SECRETS, named after the role
    (`into/policy-gate`, `into/provisioner`, ...), made by `private_credentials`.

    For services that run apart from `source`, as compose's containers do: each is given its own
    directory, and never sees the others' seeds, the operator's, or the database superuser's password.
    """
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    into.chmod(0o700)
    return {role: private_credentials(source, role, into / role.value) for role in SERVICE_SECRETS}


def authorization_config(stores: Iterable[CredentialStore], extra_users: Iterable[dict[str, object]] = ()) -> str:
    """The `authorization` block of nats-server's configuration for these installations.

    Written as JSON, which nats-server's configuration format accepts as it is: every subject is
    a quoted string, so a `$JS...` subject is never read as a variable.
    """
    users = [user for store in stores for user in store.users()]
    users.extend(extra_users)
    return "authorization: " + json.dumps({"users": users}, indent=2) + "\n"


def write_authorization(
    target: Path, stores: Iterable[CredentialStore], extra_users: Iterable[dict[str, object]] = ()
) -> None:
    """Write the server's list of identities to `target`, whole or not at all (a reload never
    reads half a file)."""
    staged = target.with_suffix(".tmp")
    staged.write_text(authorization_config(stores, extra_users), encoding="utf-8")
    staged.replace(target)


def superuser(directory: Path) -> tuple[Path, dict[str, object]]:
    """An identity allowed everything, and its entry for a server's `users`.

    For test suites and benchmarks, which create and delete installations (streams, consumers)
    on one server; `warden up` never makes one.
    """
    store = CredentialStore(directory, "superuser")
    store.ensure_installation()
    seed_file = store.seed_file(Role.OPERATOR)
    return seed_file, {"nkey": public_key(read_seed(seed_file))}
