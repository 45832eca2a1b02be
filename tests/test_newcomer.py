"""The first hour, as a newcomer meets it: clear one-line errors, a stack that cannot be started twice,
outcomes reported, output that reads well, a README snippet that runs as pasted."""

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import (
    REPO_ROOT,
    AppRunner,
    eventually,
    run_warden_cli,
    settings_env,
    start_services,
    stop_services,
)
from tests.test_governed_run import start_all
from tests.test_service import _closed_port
from tests.test_stack import start_stack, stop_stack
from warden import stack
from warden.endpoints import read_endpoints
from warden.settings import Settings


async def warden(
    *args: str, cwd: Path, env: dict[str, str] | None = None, within: float = 20.0
) -> tuple[int, str, str]:
    """Run `warden` in `cwd` with no WARDEN_ settings but `env`: status, stdout, stderr."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("WARDEN_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "warden.cli",
        *args,
        cwd=cwd,
        env={**clean, **(env or {}), "PYTHONPATH": str(REPO_ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_with_no_stack_the_cli_says_so_at_once(tmp_path: Path) -> None:
    """No `warden up` here and no WARDEN_NATS_URL: one line naming the fix, a non-zero exit, in seconds."""
    started = time.monotonic()
    status, _, stderr = await warden("submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice", cwd=tmp_path)
    assert status == 1
    assert stderr.strip().count("\n") == 0, stderr
    assert "no Warden stack here" in stderr
    assert "warden up" in stderr
    assert time.monotonic() - started < 15


async def test_a_stale_endpoints_file_is_reported_not_followed(tmp_path: Path) -> None:
    """A stack that died left its endpoints file: the CLI says the stack is gone instead of hanging on it."""
    state = tmp_path / ".warden"
    state.mkdir()
    (state / "endpoints.json").write_text(
        json.dumps(
            {"nats_url": f"nats://127.0.0.1:{_closed_port()}", "database_url": "postgresql://x/y", "pid": 999_999_999}
        )
    )
    status, _, stderr = await warden("tail", "--tenant", "acme", cwd=tmp_path)
    assert status == 1
    assert "is gone" in stderr


async def test_an_unreachable_nats_url_is_one_clear_line(tmp_path: Path) -> None:
    started = time.monotonic()
    env = {"WARDEN_NATS_URL": f"nats://127.0.0.1:{_closed_port()}"}
    status, _, stderr = await warden(
        "submit", "--tenant", "acme", "--agent", "demo", "--actor", "a", cwd=tmp_path, env=env
    )
    assert status == 1
    assert stderr.startswith("warden: cannot reach NATS at"), stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - started < 15


async def test_a_second_up_in_the_same_directory_refuses_and_touches_nothing(tmp_path: Path) -> None:
    """The running stack keeps its servers, its endpoints file and its ability to serve."""
    state = tmp_path / "state"
    process, _, _ = await start_stack(state)
    try:
        before = (state / "endpoints.json").read_text()
        status, _, stderr = await warden("up", "--state-dir", str(state), cwd=tmp_path, within=30)
        assert status == 1
        assert "already running" in stderr
        assert (state / "endpoints.json").read_text() == before
        assert read_endpoints(state).pid == process.pid
        status, stdout, _ = await warden(
            *("submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice", "--wait", "30"),
            cwd=tmp_path,
            env={"WARDEN_STATE_DIR": str(state)},
            within=60,
        )
        assert status == 0, stdout
        assert json.loads(stdout)["outcome"]["status"] == "succeeded"
    finally:
        assert await stop_stack(process) == 0
    assert not (state / "endpoints.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ("submit", "--tenant", "acme", "--agent", "demo", "--actor", "a", "--input", "{bad"),
            "--input is not JSON",
            id="bad-json",
        ),
        pytest.param(
            ("submit", "--tenant", "acme", "--agent", "demo", "--actor", "a", "--input", "[1]"),
            "must be a JSON object",
            id="not-an-object",
        ),
        pytest.param(
            ("submit", "--tenant", "a b", "--agent", "demo", "--actor", "a"),
            "invalid submission: tenant",
            id="bad-tenant",
        ),
        pytest.param(("runs", "--run", "no-such-run"), "no run 'no-such-run'", id="unknown-run"),
    ],
)
async def test_bad_arguments_are_one_line_and_exit_2(
    settings: Settings, db: asyncpg.Connection, run_app: AppRunner, args: tuple[str, ...], message: str
) -> None:
    await start_all(run_app, settings)  # the projector makes the tables `runs` reads
    await eventually(lambda: _tables(db))
    result = await run_warden_cli_status(settings, *args)
    assert result[0] == 2, result
    assert result[2].startswith("warden: "), result[2]
    assert message in result[2], result[2]
    assert result[2].strip().count("\n") == 0


async def run_warden_cli_status(settings: Settings, *args: str) -> tuple[int, str, str]:
    result = await run_warden_cli(settings, *args)
    return result.status, result.stdout, result.stderr


async def _tables(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT to_regclass('runs') IS NOT NULL"))


async def test_submit_reports_the_outcome_and_runs_shows_rejections(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """`--wait` prints succeeded (exit 0) or denied with the reason (exit 1); `runs` lists rejected commands."""
    await start_all(run_app, settings)
    ok = await run_warden_cli(
        settings, "submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice", "--wait", "30"
    )
    assert (ok.status, json.loads(ok.stdout)["outcome"]) == (0, {"status": "succeeded", "reasons": []})
    unknown = await run_warden_cli(
        settings, "submit", "--tenant", "acme", "--agent", "nosuch", "--actor", "alice", "--wait", "30"
    )
    outcome = json.loads(unknown.stdout)["outcome"]
    assert (unknown.status, outcome["status"]) == (1, "denied")
    assert "unknown agent 'nosuch'" in outcome["reasons"][0]

    await nc.jetstream().publish(f"{settings.subject_prefix}.cmd.acme.run.submitted", b"{not json")
    await eventually(lambda: db.fetchval("SELECT count(*) FROM rejected_commands"))
    listing = await run_warden_cli(settings, "runs", "--tenant", "acme")
    assert "rejected commands" in listing.stdout
    assert "not_json: body is not JSON" in listing.stdout
    assert re.search(r"succeeded\s+alice\s+2\s+2", listing.stdout), "the list counts as the timeline does"
    run_id = json.loads(ok.stdout)["run_id"]
    timeline = await run_warden_cli(settings, "runs", "--run", run_id)
    assert "after 2 model turns and 2 tool calls" in timeline.stdout


async def test_tail_into_a_closed_pipe_ends_quietly(settings: Settings, run_app: AppRunner) -> None:
    """`warden tail | head -1`: the pipe closes early; no traceback, no error."""
    await start_all(run_app, settings)
    await run_warden_cli(settings, "submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice", "--wait", "30")
    env = settings_env(settings)
    process = await asyncio.create_subprocess_shell(
        f"{sys.executable} -m warden.cli tail --tenant acme --idle-timeout 5 | head -1",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert stdout.decode().count("\n") == 1
    assert stderr.decode() == ""


async def test_the_readme_snippet_runs_as_a_file(settings: Settings, tmp_path: Path) -> None:
    """The Python example in README.md, saved as a file and run against a stack, prints the run's outcome."""
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    assert snippet is not None
    (tmp_path / "example.py").write_text(snippet.group(1))
    processes = await start_services(settings)
    try:
        env = {**settings_env(settings), "PYTHONPATH": str(REPO_ROOT)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "example.py",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await stop_services(processes)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert ": succeeded" in stdout.decode()
    assert "run.succeeded" in stdout.decode()


async def test_a_service_healthy_for_a_while_restarts_quickly_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's backoff starts over once a service has run healthily: the fifth crash in a day costs 0.5 s."""
    monkeypatch.setattr(stack, "HEALTHY_AFTER_SECONDS", 0.2)

    class Sleeper(stack.ServiceProcess):
        async def start(self) -> None:
            self.process = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(0.3)")

    service = Sleeper("sleeper", {}, tmp_path / "log")
    service.restarts = 4  # as if it had crashed four times before
    stopping = asyncio.Event()
    supervisor = asyncio.create_task(stack._supervise(service, stopping))
    await eventually(lambda: _ready(service.restarts == 1), within=5)
    stopping.set()
    await supervisor


async def _ready(value: bool) -> bool:
    return value


async def test_every_log_line_of_a_service_is_one_json_object(settings: Settings) -> None:
    """FastStream's own lines and tracebacks included: a service's log file is JSON lines, nothing else."""
    env = {**settings_env(settings), "WARDEN_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "warden.policy_gate", cwd=REPO_ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    await asyncio.sleep(3.0)
    process.terminate()
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert any("FastStream app" in line for line in lines), lines[:5]
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_make_demo_installs_only_what_warden_runs_on() -> None:
    """`make demo` syncs without the dev group (test tools) or the bench group (Celery, matplotlib)."""
    import subprocess  # noqa: PLC0415

    planned = subprocess.run(["make", "-n", "demo"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    sync = next(line for line in planned.splitlines() if " sync " in line)
    assert "--no-dev" in sync
    assert "--all-groups" not in sync
    assert "--group" not in sync


async def test_commands_that_need_no_stack_work_without_one(tmp_path: Path) -> None:
    """`warden policy test` reads files only: no stack is asked for, and by default it tests the shipped pack."""
    status, stdout, stderr = await warden("policy", "test", str(REPO_ROOT / "policies"), cwd=tmp_path)
    assert status == 0, stderr
    assert "passed" in stdout
    status, shipped, stderr = await warden("policy", "test", cwd=tmp_path)
    assert status == 0, stderr
    # The same tests, named by the same path inside the gate's package data.
    assert shipped.replace("/services/policy_gate/src/warden/policy_gate/policies/", "/policies/") == stdout
