"""`warden credentials hand-out`: each service's own directory, holding its seed and what its work
needs, nothing of another identity's."""

import stat
from pathlib import Path

from tests.conftest import warden_cli
from warden.credentials import SERVICE_SECRETS
from warden.database import SUPERUSER_PASSWORD_FILE
from warden.identity import SEED_SUFFIX
from warden.permissions import INSTALLATION_ROLES, Role
from warden.settings import Settings


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
