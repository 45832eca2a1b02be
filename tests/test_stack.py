"""`warden up` as a user runs it: real servers and services, clean stop, no orphans, data kept."""

import asyncio
import os
import re
import signal
import stat
import sys
from pathlib import Path

import asyncpg
import psutil

from tests.conftest import REPO_ROOT, eventually
from warden.client import WardenClient
from warden.database import DatabaseRole, login_url
from warden.endpoints import credentials_dir
from warden.errors import RetryableError
from warden.permissions import Role
from warden.signing import EVIDENCE_KEY_FILE, EVIDENCE_KEYS_FILE
from warden.stack import SERVICES
from warden.streams import provision


async def start_stack(state_dir: Path, *options: str) -> tuple[asyncio.subprocess.Process, str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WARDEN_")}
    # Kept beside the state (not thrown away): a stack that fails to start says why in the failure.
    errors = (state_dir.parent / "warden-up.stderr").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden.cli",
        "up",
        "--state-dir",
        str(state_dir),
        *options,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=errors,
    )
    errors.close()
    assert process.stdout is not None
    output = ""
    while "Press Ctrl-C" not in output:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if not line:
            await process.wait()
            stderr = (state_dir.parent / "warden-up.stderr").read_text(errors="replace")[-6000:]
            raise AssertionError(f"warden up exited early ({process.returncode}): {output}\n{stderr}")
        output += line.decode()
    nats_url = re.search(r"NATS:\s+(\S+)", output)
    database_url = re.search(r"Postgres:\s+(\S+)", output)
    assert nats_url, output
    assert database_url, output
    assert "@" not in database_url.group(1), "no login is printed"
    # What a reader of the audit (the CLI, the timeline) logs in as.
    reader = login_url(database_url.group(1), credentials_dir(state_dir), DatabaseRole.READER)
    return process, nats_url.group(1), reader


def operator(tmp_path: Path, role: Role = Role.OPERATOR) -> Path:
    """The credential `warden up --state-dir tmp_path/state` made for `role` (the operator: the CLI's)."""
    return credentials_dir(tmp_path / "state") / f"{role.value}.nk"


async def stop_stack(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.wait(), 30)


def _is_service(child: psutil.Process) -> bool:
    """Whether a process is one of Warden's services (`python -m warden.<service>`)."""
    return "-m warden." in _command_line(child)


def _command_line(child: psutil.Process) -> str:
    try:
        return " ".join(child.cmdline())
    except psutil.Error:
        return ""  # gone meanwhile


async def _ready(value: object) -> object:
    return value


def _take_evidence_key_away(state_dir: Path) -> Path:
    """The operator's evidence key, which `up` made beside the others (and in no service's directory),
    removed with its public half, as an installation made before evidence bundles were signed lacks it."""
    evidence_key = credentials_dir(state_dir) / EVIDENCE_KEY_FILE
    assert stat.S_IMODE(evidence_key.stat().st_mode) == 0o600
    evidence_key.unlink()
    (evidence_key.parent / EVIDENCE_KEYS_FILE).unlink()
    return evidence_key


async def test_up_serves_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    """`warden up` runs a submitted run, restarts a service that dies; SIGTERM stops every child; a second
    `up` still has all of it, and makes the operator's evidence key if the installation has none."""
    process, nats_url, database_url = await start_stack(tmp_path / "state")
    try:
        children = psutil.Process(process.pid).children(recursive=True)
        names = {child.name() for child in children}
        assert {"nats-server", "postgres"} <= names, names
        assert sum(_is_service(child) for child in children) == len(SERVICES)
        # Each service is handed a credentials directory holding its own seed and what its work
        # needs, none of another identity's (a compromised service is that service only).
        handed = {
            _command_line(child).rsplit("warden.", 1)[-1]: Path(child.environ()["WARDEN_NATS_CREDENTIALS_DIR"])
            for child in children
            if _is_service(child)
        }
        held = {service: sorted(path.name for path in directory.iterdir()) for service, directory in handed.items()}
        assert held == {
            "policy_gate": ["decision-keys.pub", "decision-signing.key", "policy-gate.nk"],
            "scheduler": ["decision-keys.pub", "scheduler.nk"],
            "agent_runner": ["agent-runner.nk", "decision-keys.pub"],
            "audit_projector": [
                "audit-projector.nk",
                "checkpoint-keys.pub",
                "checkpoint-signing.key",
                "postgres-projector.password",
            ],
        }
        assert all(stat.S_IMODE(directory.stat().st_mode) == 0o700 for directory in handed.values())

        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            receipt = await client.submit_run(tenant="acme", agent="demo", actor="alice", run_id="kept-run")
        db = await asyncpg.connect(database_url)

        await eventually(lambda: run_succeeded(db, "kept-run"), within=60)
        await asyncio.sleep(0.5)  # the run's last events reach the projector's next batch
        rows_before = await db.fetchval("SELECT count(*) FROM events")
        # Services record no spans without an exporter, yet the run's trace id reaches every row.
        trace_ids = await db.fetch("SELECT DISTINCT trace_id FROM events WHERE entity_id = 'kept-run'")
        assert len(trace_ids) == 1
        assert trace_ids[0]["trace_id"] is not None
        await db.close()
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            stored_before = (await client.js.stream_info(client.streams.commands)).state.messages

        # A service that dies (here, killed) is started again by the supervisor.
        projector = next(child for child in children if "warden.audit_projector" in " ".join(child.cmdline()))
        projector.kill()

        def restarted() -> list[psutil.Process]:
            return [
                child
                for child in psutil.Process(process.pid).children(recursive=True)
                if child.pid != projector.pid and "warden.audit_projector" in _command_line(child)
            ]

        await eventually(lambda: _ready(restarted()), within=30)
        children = psutil.Process(process.pid).children(recursive=True)
    finally:
        exit_code = await stop_stack(process)
    assert exit_code == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans left behind: {alive}"
    evidence_key = _take_evidence_key_away(tmp_path / "state")

    process, nats_url, database_url = await start_stack(tmp_path / "state")
    try:
        assert {path.name for path in evidence_key.parent.iterdir()} >= {EVIDENCE_KEY_FILE, EVIDENCE_KEYS_FILE}
        db = await asyncpg.connect(database_url)
        assert await db.fetchval("SELECT count(*) FROM events") == rows_before
        assert await db.fetchval("SELECT status FROM runs WHERE run_id = 'kept-run'") == "succeeded"
        await db.close()
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            stored = (await client.js.stream_info(client.streams.commands)).state.messages
        assert stored == stored_before
        assert receipt.stream_seq == 1
    finally:
        await stop_stack(process)


async def test_up_runs_a_three_node_cluster_with_r3_streams(tmp_path: Path) -> None:
    """`warden up --cluster 3`: three NATS nodes, every stream on all three, a run governed end to end;
    provisioning again with one replica is refused rather than weakening the streams."""
    process, nats_url, database_url = await start_stack(tmp_path / "state", "--cluster", "3")
    try:
        assert len(nats_url.split(",")) == 3
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path)) as client:
            await client.submit_run(tenant="acme", agent="demo", actor="alice", run_id="clustered")
        async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path, Role.PROVISIONER)) as client:
            for stream in (client.streams.commands, client.streams.events, client.streams.work):
                info = await client.js.stream_info(stream)
                assert info.config.num_replicas == 3
                assert info.cluster is not None
                assert len(info.cluster.replicas or []) == 2
            result = await provision(client.js, client.subjects, replicas=1)
            assert {change.setting for change in result.refused} == {"num_replicas"}
            assert not result.changed
            assert (await client.js.stream_info(client.streams.events)).config.num_replicas == 3
        db = await asyncpg.connect(database_url)
        try:
            await eventually(lambda: run_succeeded(db, "clustered"), within=60)
        finally:
            await db.close()
    finally:
        assert await stop_stack(process) == 0


async def test_up_starts_a_killed_nats_server_or_postgres_again(tmp_path: Path) -> None:
    """SIGKILL nats-server, then Postgres, under a running stack: each comes back on its port, and runs go on."""
    process, nats_url, database_url = await start_stack(tmp_path / "state")
    try:
        for name in ("nats-server", "postgres"):
            server = next(
                child
                for child in psutil.Process(process.pid).children(recursive=True)
                if child.name() == name and (name != "postgres" or child.ppid() == process.pid)
            )
            server.kill()

            def again(name: str = name, old: int = server.pid) -> bool:
                children = psutil.Process(process.pid).children(recursive=False)
                return any(child.pid != old and child.name() == name for child in children)

            await eventually(lambda again=again: _ready(again()), within=60)  # type: ignore[misc]
            run_id = f"after-{name}"
            async with await WardenClient.connect(nats_url, seed_file=operator(tmp_path), error_cb=_ignore) as client:
                await eventually(lambda run_id=run_id: _submitted(client, run_id), within=60)  # type: ignore[misc]
            db = await eventually(lambda: _connected(database_url), within=60)
            try:
                await eventually(lambda db=db, run_id=run_id: run_succeeded(db, run_id), within=90)  # type: ignore[misc]
            finally:
                await db.close()
    finally:
        assert await stop_stack(process) == 0


async def run_succeeded(db: asyncpg.Connection, run_id: str) -> bool:
    try:
        return bool(await db.fetchval("SELECT count(*) FROM runs WHERE run_id = $1 AND status = 'succeeded'", run_id))
    except asyncpg.UndefinedTableError:
        return False  # the projector is still creating its tables


async def _ignore(_: Exception) -> None:
    """Connection errors while a server restarts are expected here."""


async def _submitted(client: WardenClient, run_id: str) -> bool:
    try:
        await client.submit_run(tenant="acme", agent="demo", actor="alice", run_id=run_id)
    except RetryableError:
        return False
    return True


async def _connected(database_url: str) -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(database_url, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return None
