"""No credential or key shows in a service's log, an audit row or a command's output."""

import asyncio
import base64
import json
import uuid
from pathlib import Path

import asyncpg
from nats.aio.client import Client as NatsClient

from tests.conftest import Servers, eventually, run_warden_cli, start_services, stop_services
from tests.test_governed_run import run_row
from warden.client import WardenClient
from warden.identity import read_seed
from warden.secret_arguments import SecretArguments, shipped_policy_dir
from warden.settings import Settings
from warden.streams import StreamNames


def secrets_of(settings: Settings) -> dict[str, bytes]:
    """Every secret the installation holds: each NKey seed, each signing key (the gate's, the projector's
    checkpoint key, the operator's evidence key; raw and decoded) and its database roles' passwords."""
    assert settings.nats_credentials_dir is not None
    found: dict[str, bytes] = {}
    for path in settings.nats_credentials_dir.rglob("*"):
        if path.suffix in (".nk", ".key", ".password"):
            secret = path.read_bytes().strip()
            found[path.name] = secret
            if path.suffix == ".key":
                found[f"{path.name} (raw)"] = base64.b64decode(secret)
    assert len(found) >= 10, found.keys()  # six roles, the signing key (twice), three database roles
    return found


async def test_no_secret_reaches_a_log_an_audit_row_or_the_cli(
    servers: Servers, settings: Settings, nc: NatsClient, db: asyncpg.Connection, tmp_path: Path
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
            # The one command that reads the evidence key: it signs with it, and shows only its public half.
            await run_warden_cli(settings, "audit", "export", "--tenant", "acme", "--out", str(tmp_path / "bundle")),
            await run_warden_cli(settings, "audit", "verify", "--bundle", str(tmp_path / "bundle")),
        ]
        assert cli[-2].status == 0, cli[-2].stderr
        await asyncio.sleep(0.5)
    finally:
        await stop_services(processes)
    logs = await asyncio.to_thread(lambda: {path.name: path.read_bytes() for path in tmp_path.glob("*.log")})
    assert len(logs) == 4
    if servers.embedded is not None:  # the server's own log: the roles' passwords were set by statement
        logs["postgres.log"] = (servers.embedded.state_dir / "postgres.log").read_bytes()
    found = []
    for table in ("events", "runs", "decisions", "tool_calls", "rejected_commands"):
        found += [str(tuple(row)).encode() for row in await db.fetch(f"SELECT * FROM {table}")]
    rows = b"\n".join(found)
    assert receipt.run_id.encode() in rows  # the search looks at the real thing
    outputs = b"\n".join((result.stdout + result.stderr).encode() for result in cli)
    bundle = b"\n".join(path.read_bytes() for path in (tmp_path / "bundle").rglob("*") if path.is_file())
    assert b'"signature"' in bundle
    assert b"policy-gate" in outputs  # `credentials list` names identities (public keys only)
    for name, secret in secrets_of(settings).items():
        for where, text in (*logs.items(), ("audit rows", rows), ("CLI output", outputs), ("evidence bundle", bundle)):
            assert secret not in text, f"{name} appears in {where}"


async def test_a_secret_tool_argument_is_recorded_only_as_its_keyed_hash(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An `authorization` header value (marked secret in the shipped policy data) is in no stream
    message and no audit row; the record holds its HMAC under the runners' key, and the call ran."""
    token = f"Bearer marker-{uuid.uuid4().hex}"
    agents = tmp_path / "agents"
    agents.mkdir()
    step = {"tool_call": {"tool": "web.fetch", "arguments": {"url": "https://example.com/a", "authorization": token}}}
    definition = {"name": "demo", "description": "fetches with a token", "on_refusal": "fail", "steps": [step]}
    (agents / "demo.json").write_text(json.dumps(definition))
    processes = await start_services(settings.model_copy(update={"agents_dir": agents}))
    try:
        receipt = await WardenClient(nc, settings.subject_prefix).submit_run(tenant="acme", agent="demo", actor="alice")
        await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=60)
    finally:
        await stop_services(processes)
    assert await db.fetchval("SELECT status FROM runs WHERE run_id = $1", receipt.run_id) == "succeeded"

    recorded = await db.fetchval(
        "SELECT arguments->>'authorization' FROM tool_calls WHERE run_id = $1 AND outcome = 'ok'", receipt.run_id
    )
    runner_seed = settings.seed_file_for("agent-runner")
    assert runner_seed is not None
    concealer = SecretArguments.from_policy_dir(shipped_policy_dir(), read_seed(runner_seed))
    assert recorded == concealer.digest(token), "the record holds the keyed hash of the value the tool got"

    stored = []
    for stream in StreamNames.for_prefix(settings.subject_prefix).audited:
        last = (await nc.jetstream().stream_info(stream)).state.last_seq
        stored += [(await nc.jetstream().get_msg(stream, seq)).data or b"" for seq in range(1, last + 1)]
    assert any(b"web.fetch" in message for message in stored)  # the search looks at the real thing
    assert not any(token.encode() in message for message in stored), "the secret is in a stream message"
    rows = []
    for table in ("events", "runs", "decisions", "tool_calls"):
        rows += [str(tuple(row)) for row in await db.fetch(f"SELECT * FROM {table}")]
    assert not any(token in row for row in rows), "the secret is in an audit row"
