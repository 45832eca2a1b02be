"""Where a running `warden up` stack listens: the file it writes under its state directory, and how to find it.

A client, the CLI and a second `warden up` all read it. Only nats-py-free standard library here,
so a client-only install can find the stack too.
"""

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from warden.errors import PermanentError

ENDPOINTS_FILE = "endpoints.json"
LOCK_FILE = "stack.lock"


class NoStack(PermanentError):
    """No running Warden stack could be found (and no servers were named)."""


class StackAlreadyRunning(PermanentError):
    """Another `warden up` already runs on this state directory."""


@dataclass(frozen=True)
class Endpoints:
    nats_url: str
    database_url: str
    pid: int  # of the `warden up` that wrote them


def credentials_dir(state_dir: Path) -> Path:
    """Where the stack `warden up` runs on `state_dir` keeps its NATS identities and decision keys."""
    return state_dir / "credentials"


def endpoints_path(state_dir: Path) -> Path:
    return Path(state_dir) / ENDPOINTS_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    return True


def read_endpoints(state_dir: Path) -> Endpoints:
    """The endpoints of the stack running on `state_dir`, or `NoStack` saying why there is none."""
    path = endpoints_path(state_dir)
    try:
        document = json.loads(path.read_text())
        endpoints = Endpoints(document["nats_url"], document["database_url"], int(document.get("pid", 0)))
    except FileNotFoundError:
        raise NoStack(
            f"no Warden stack here (no {path}); start one with `warden up`, or set WARDEN_NATS_URL "
            "(and WARDEN_DATABASE_URL) to use servers of your own"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise NoStack(f"{path} is not a Warden endpoints file ({exc}); start a stack with `warden up`") from None
    if not endpoints.pid or not _alive(endpoints.pid):
        raise NoStack(
            f"the Warden stack that wrote {path} is gone (pid {endpoints.pid or '?'}); start one with `warden up`"
        )
    return endpoints


def write_endpoints(state_dir: Path, nats_url: str, database_url: str) -> None:
    path = endpoints_path(state_dir)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(Endpoints(nats_url, database_url, os.getpid())), indent=2))
    temporary.replace(path)  # readers never see half a file


def remove_endpoints(state_dir: Path) -> None:
    """Remove the endpoints file, if this process wrote it (never another stack's)."""
    path = endpoints_path(state_dir)
    try:
        if int(json.loads(path.read_text()).get("pid", 0)) == os.getpid():
            path.unlink()
    except (FileNotFoundError, ValueError, TypeError):
        return


def hold_state_dir(state_dir: Path) -> IO[str]:
    """Lock `state_dir` for this `warden up`, or raise `StackAlreadyRunning` at once.

    The lock is the kernel's (flock): it is released when this process dies, however it dies, so a
    crashed stack never leaves a lock behind. Keep the returned file open for as long as the stack runs.
    """
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    lock = (Path(state_dir) / LOCK_FILE).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        running = ""
        with contextlib.suppress(NoStack):
            running = f" (pid {read_endpoints(state_dir).pid})"
        raise StackAlreadyRunning(
            f"a Warden stack is already running on {Path(state_dir).resolve()}{running}; stop it first, "
            "or give another --state-dir"
        ) from None
    return lock
