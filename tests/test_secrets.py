"""No credential or key shows in a service's log, an audit row or a command's output."""

import asyncio
import base64
from pathlib import Path

import asyncpg
from nats.aio.client import Client as NatsClient

from tests.conftest import eventually, run_warden_cli, start_services, stop_services
from tests.test_governed_run import run_row
from warden.client import WardenClient
from warden.settings import Settings


def secrets_of(settings: Settings) -> dict[str, bytes]:
    """Every secret the installation holds: each NKey seed and the gate's signing key, raw and decoded."""
    assert settings.nats_credentials_dir is not None
    found: dict[str, bytes] = {}
    for path in settings.nats_credentials_dir.rglob("*"):
        if path.suffix in (".nk", ".key"):
            secret = path.read_bytes().strip()
            found[path.name] = secret
            if path.suffix == ".key":
                found[f"{path.name} (raw)"] = base64.b64decode(secret)
    assert len(found) >= 7, found.keys()  # six roles and the signing key (twice)
    return found


async def test_no_secret_reaches_a_log_an_audit_row_or_the_cli(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, tmp_path: Path
) -> None:
    processes = await start_services(settings, tmp_path)
    try:
        client = WardenClient(nc, settings.subject_prefix)
        receipt = await client.submit_run(tenant="acme", agent="demo", actor="alice")
        await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=60)
        cli = [
            await run_warden_cli(settings, "runs", "--run", receipt.run_id),
            await run_warden_cli(settings, "tail", "--tenant", "acme", "--idle-timeout", "1"),
            await run_warden_cli(settings, "credentials", "list"),
        ]
        await asyncio.sleep(0.5)
    finally:
        await stop_services(processes)
    logs = await asyncio.to_thread(lambda: {path.name: path.read_bytes() for path in tmp_path.glob("*.log")})
    assert len(logs) == 4
    found = []
    for table in ("events", "runs", "decisions", "tool_calls", "rejected_commands"):
        found += [str(tuple(row)).encode() for row in await db.fetch(f"SELECT * FROM {table}")]
    rows = b"\n".join(found)
    assert receipt.run_id.encode() in rows  # the search looks at the real thing
    outputs = b"\n".join((result.stdout + result.stderr).encode() for result in cli)
    assert b"policy-gate" in outputs  # `credentials list` names identities (public keys only)
    for name, secret in secrets_of(settings).items():
        for where, text in (*logs.items(), ("audit rows", rows), ("CLI output", outputs)):
            assert secret not in text, f"{name} appears in {where}"
