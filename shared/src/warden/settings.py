"""Settings every service and client reads from the environment (all prefixed `WARDEN_`)."""

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from warden.database import DatabaseRole, login_url
from warden.endpoints import credentials_dir, read_endpoints
from warden.signing import (
    CHECKPOINT_KEY_FILE,
    CHECKPOINT_KEYS_FILE,
    EVIDENCE_KEY_FILE,
    EVIDENCE_KEYS_FILE,
    SIGNING_KEY_FILE,
    TRUSTED_KEYS_FILE,
    SigningKeyError,
)


class Settings(BaseSettings):
    """Where the servers are and how this installation names its subjects and streams."""

    model_config = SettingsConfigDict(env_prefix="WARDEN_", frozen=True)

    # One URL, or a cluster's seed nodes separated by commas: nats://a:4222,nats://b:4222
    nats_url: str = "nats://127.0.0.1:4222"
    # Where the audit database is. Without a user name, each process logs in as its installation
    # role (warden.database), with the password file in `nats_credentials_dir`; with one, as given.
    database_url: str = "postgresql://127.0.0.1:5432/warden"
    subject_prefix: str = Field(default="warden", pattern=r"^[A-Za-z0-9_-]+$")
    # Who this process is on NATS: the NKey seed file it authenticates with. Unset: its role's
    # seed in `nats_credentials_dir` (`<role>.nk`, as `warden up` and `warden credentials init`
    # write them). Neither: it connects anonymously, which a Warden NATS server refuses.
    nats_seed_file: Path | None = None
    nats_credentials_dir: Path | None = None
    # The policy gate's decision signing key, and the public keys runners trust decisions from.
    # Unset: `decision-signing.key` and `decision-keys.pub` in `nats_credentials_dir`.
    decision_signing_key_file: Path | None = None
    decision_keys_file: Path | None = None
    # The audit projector's checkpoint key, and the public keys checkpoints are verified with.
    # Unset: `checkpoint-signing.key` and `checkpoint-keys.pub` in `nats_credentials_dir`.
    checkpoint_signing_key_file: Path | None = None
    checkpoint_keys_file: Path | None = None
    # The operator's evidence key, which signs the manifest of `warden audit export`'s bundles, and
    # the public keys a bundle's manifest is verified with. Unset: `evidence-signing.key` and
    # `evidence-keys.pub` in `nats_credentials_dir`.
    evidence_signing_key_file: Path | None = None
    evidence_keys_file: Path | None = None
    # A checkpoint is signed for a chain once it has grown by this many rows, or this many seconds
    # after its last checkpoint if it has grown at all.
    checkpoint_every_events: int = Field(default=10_000, gt=0)
    checkpoint_every_seconds: float = Field(default=60.0, gt=0)
    # Replicas of each stream (3 on a three-node cluster). Provisioning never lowers a stream's
    # replicas below what it has unless forced (`warden provision --force`).
    stream_replicas: int = Field(default=1, ge=1, le=5)
    state_dir: Path = Path(".warden")
    # Commands over this size are rejected (and recorded). The streams' hard ceiling is larger,
    # so an oversized command is still stored and the rejection can point at it.
    max_command_bytes: int = Field(default=64 * 1024, gt=0)
    # Rego policies and their data, read by the policy gate at start. None: the policy pack that
    # ships with the policy gate (`policies/` of the repository).
    policy_dir: Path | None = None
    # Agent definitions (scripted agents), read by the agent runner. None: the agents that ship
    # with the runner (`agents/` of the repository).
    agents_dir: Path | None = None
    # MCP tool servers per tenant (JSON; see docs/agents.md), read by the agent runner. None: no
    # MCP tools, only the built-in ones.
    tool_servers_file: Path | None = None
    # Runs of one tenant that may be dispatched at once; the scheduler never exceeds it.
    tenant_concurrency: int = Field(default=4, ge=1)
    # How many runs one agent runner process executes at once.
    runner_concurrency: int = Field(default=16, ge=1)
    # A runner must show progress within this many seconds or its run is handed to another runner.
    runner_ack_wait_seconds: float = Field(default=30.0, gt=0)
    # How long a runner waits for the gate's decision on a tool call before treating it as a refusal.
    # Longer than a JetStream cluster's leader election (seen here: 7 to 12 seconds), during which
    # the gate cannot store its decision: a failover must not refuse tool calls the policy allows.
    decision_timeout_seconds: float = Field(default=30.0, gt=0)
    # Once its consumer loops have stopped, a service exits after this many seconds even if closing
    # its connections hangs, so that its supervisor can restart it.
    shutdown_deadline_seconds: float = Field(default=15.0, gt=0)
    log_level: str = "INFO"
    log_format: str = Field(default="auto", pattern=r"^(auto|json|console)$")

    def seed_file_for(self, role: str) -> Path | None:
        """The seed a process in `role` (a `warden.permissions.Role` value) connects with."""
        if self.nats_seed_file is not None:
            return self.nats_seed_file
        if self.nats_credentials_dir is not None:
            return self.nats_credentials_dir / f"{role}.nk"
        return None

    def database_url_for(self, role: DatabaseRole) -> str:
        """The database URL, with the login of `role` (see warden.database). Never log it."""
        return login_url(self.database_url, self.nats_credentials_dir, role)

    def signing_key_path(self) -> Path:
        return self._credential_file(self.decision_signing_key_file, SIGNING_KEY_FILE, "DECISION_SIGNING_KEY_FILE")

    def trusted_keys_path(self) -> Path:
        return self._credential_file(self.decision_keys_file, TRUSTED_KEYS_FILE, "DECISION_KEYS_FILE")

    def checkpoint_key_path(self) -> Path:
        explicit = self.checkpoint_signing_key_file
        return self._credential_file(explicit, CHECKPOINT_KEY_FILE, "CHECKPOINT_SIGNING_KEY_FILE")

    def checkpoint_keys_path(self) -> Path:
        return self._credential_file(self.checkpoint_keys_file, CHECKPOINT_KEYS_FILE, "CHECKPOINT_KEYS_FILE")

    def evidence_key_path(self) -> Path:
        return self._credential_file(self.evidence_signing_key_file, EVIDENCE_KEY_FILE, "EVIDENCE_SIGNING_KEY_FILE")

    def evidence_keys_path(self) -> Path:
        return self._credential_file(self.evidence_keys_file, EVIDENCE_KEYS_FILE, "EVIDENCE_KEYS_FILE")

    def _credential_file(self, explicit: Path | None, name: str, variable: str) -> Path:
        if explicit is not None:
            return explicit
        if self.nats_credentials_dir is not None:
            return self.nats_credentials_dir / name
        raise SigningKeyError(
            f"no {name}: set WARDEN_{variable}, or WARDEN_NATS_CREDENTIALS_DIR to a directory holding it"
        )


def settings_for_running_stack(settings: Settings) -> Settings:
    """Point CLI commands at the stack `warden up` runs on the state directory, unless URLs were given.

    Raises `NoStack` (one clear line, at once) rather than falling back to default ports, where
    something else may listen.
    """
    if "WARDEN_NATS_URL" in os.environ:
        return settings
    endpoints = read_endpoints(settings.state_dir)
    update: dict[str, object] = {"nats_url": endpoints.nats_url, "database_url": endpoints.database_url}
    if settings.nats_credentials_dir is None:
        update["nats_credentials_dir"] = credentials_dir(settings.state_dir)
    return settings.model_copy(update=update)
