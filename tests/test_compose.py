"""compose.yaml gives each service only its own credentials: the directory `warden credentials
hand-out` lays out for its role, and nothing else of the `credentials` volume.

No Docker engine runs here: the command is run as compose's `credentials` service runs it, and
compose.yaml is read for who mounts what.
"""

import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.conftest import REPO_ROOT, warden_cli
from warden.credentials import SERVICE_SECRETS, CredentialStore, hand_out
from warden.database import SUPERUSER_PASSWORD_FILE
from warden.identity import SEED_SUFFIX
from warden.permissions import INSTALLATION_ROLES, Role
from warden.settings import Settings

VOLUME = "credentials"
# compose's services that run as one of the installation's roles: each named after its role, but
# for `provision`, which runs `warden provision` as the provisioner.
ROLE_OF_SERVICE = {"provision": Role.PROVISIONER} | {
    role.value: role for role in SERVICE_SECRETS if role is not Role.PROVISIONER
}


def test_every_role_but_the_operator_is_handed_a_directory() -> None:
    """The operator's seed is the installation's master key: no service is given it."""
    assert set(SERVICE_SECRETS) == set(INSTALLATION_ROLES) - {Role.OPERATOR}


async def test_hand_out_gives_each_service_its_own_seed_and_needs_only(tmp_path: Path) -> None:
    settings = Settings(subject_prefix="compose", state_dir=tmp_path / "state")
    source, into = tmp_path / "credentials", tmp_path / "credentials" / "services"
    common = ("--dir", str(source), "--state-dir", str(settings.state_dir))
    await warden_cli(settings, "credentials", "init", *common)
    await warden_cli(settings, "credentials", "issue", "--tenant", "acme", "--actor", "alice", *common)
    (source / SUPERUSER_PASSWORD_FILE).write_text("compose's credentials service adds this one\n")

    output = await warden_cli(settings, "credentials", "hand-out", *common, "--into", str(into))

    assert sorted(path.name for path in into.iterdir()) == sorted(role.value for role in SERVICE_SECRETS)
    every_seed = {path.read_bytes() for path in source.rglob(f"*{SEED_SUFFIX}") if into not in path.parents}
    assert len(every_seed) == len(INSTALLATION_ROLES) + 1  # the roles' and the tenant's
    for role, needs in SERVICE_SECRETS.items():
        own = into / role.value
        assert str(own) in output
        assert stat.S_IMODE(own.stat().st_mode) == 0o700
        seed = f"{role.value}{SEED_SUFFIX}"
        assert {path.name for path in own.iterdir()} == {seed, *(name for name in needs if (source / name).exists())}
        for path in own.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert path.read_bytes() == (source / path.name).read_bytes(), path
        assert {path.read_bytes() for path in own.iterdir()} & every_seed == {(source / seed).read_bytes()}

    # Run again (compose's `credentials` service does, on every start): copies afresh, and what the
    # credentials directory no longer holds is gone from the service's directory too.
    (source / "postgres-projector.password").unlink()
    await warden_cli(settings, "credentials", "hand-out", *common, "--into", str(into))
    assert not (into / Role.AUDIT_PROJECTOR.value / "postgres-projector.password").exists()
    assert (into / Role.AUDIT_PROJECTOR.value / f"{Role.AUDIT_PROJECTOR.value}{SEED_SUFFIX}").exists()


def _compose() -> dict[str, Any]:
    with (REPO_ROOT / "compose.yaml").open(encoding="utf-8") as file:
        document: dict[str, Any] = yaml.safe_load(file)
    services: dict[str, Any] = document["services"]
    return services


def _credential_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str | None, bool]]:
    """Each mount of the credentials volume: its target, its subpath (None: the whole volume), read-only."""
    for entry in service.get("volumes", []):
        if isinstance(entry, str):  # short syntax, `volume:target[:options]`
            source, target, *options = entry.split(":")
            if source == VOLUME:
                yield target, None, "ro" in options
        elif entry.get("source") == VOLUME:
            yield entry["target"], (entry.get("volume") or {}).get("subpath"), bool(entry.get("read_only"))


def _hand_out_command(services: dict[str, Any]) -> tuple[PurePosixPath, PurePosixPath, str]:
    """Where compose's `credentials` service keeps the credentials, where it hands them out, and its script."""
    script = " ".join(services["credentials"]["command"])
    found = re.search(r"warden credentials hand-out --dir (\S+) --into (\S+)", script)
    assert found, "compose's `credentials` service does not run `warden credentials hand-out`"
    return PurePosixPath(found[1]), PurePosixPath(found[2]), script


def _waits_for(services: dict[str, Any], name: str, other: str) -> bool:
    """Whether `name` starts only after `other`, directly or through what it waits for."""
    depends_on = services[name].get("depends_on", {})
    return any(dependency == other or _waits_for(services, dependency, other) for dependency in depends_on)


def test_each_service_mounts_only_its_own_directory(tmp_path: Path) -> None:
    services = _compose()
    directory, into, script = _hand_out_command(services)
    # Laid out after the identities exist, and before the files are handed to the services' user.
    assert script.index("credentials init") < script.index("credentials hand-out") < script.index("chown -R nobody")
    assert f"chown -R nobody {directory} " in script
    assert into.is_relative_to(directory)
    assert list(_credential_mounts(services["credentials"])) == [(str(directory), None, False)]

    # The volume as the `credentials` service leaves it, laid out by the same code.
    volume = tmp_path / "volume"
    CredentialStore(volume, "compose").ensure_installation()
    laid_out = hand_out(volume, volume / into.relative_to(directory))

    for name, role in ROLE_OF_SERVICE.items():
        mounts = list(_credential_mounts(services[name]))
        assert len(mounts) == 1, f"{name} mounts the credentials volume {len(mounts)} times"
        ((target, subpath, read_only),) = mounts
        assert subpath == str(into.relative_to(directory) / role.value), name
        assert volume / subpath == laid_out[role]
        assert (volume / subpath / f"{role.value}{SEED_SUFFIX}").is_file()
        assert read_only, name
        assert services[name]["environment"]["WARDEN_NATS_CREDENTIALS_DIR"] == target, name
        assert _waits_for(services, name, "credentials"), f"{name} may start before its directory exists"
    assert set(ROLE_OF_SERVICE.values()) == set(laid_out), "a directory no service mounts"

    # The whole volume: the one-shots that make it and install the database, the NATS servers
    # (they read the authorization made from it) and Postgres (its superuser's password).
    whole = {"credentials", "database", "postgres"} | {
        name for name, service in services.items() if str(service.get("image", "")).startswith("nats:")
    }
    for name, service in services.items():
        for _, subpath, _ in _credential_mounts(service):
            assert subpath is not None or name in whole, f"{name} mounts the whole credentials volume"
            assert subpath is None or name in ROLE_OF_SERVICE, f"{name} mounts a service's directory"
