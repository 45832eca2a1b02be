"""Settings every service and client reads from the environment (all prefixed `WARDEN_`)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the servers are and how this installation names its subjects and streams."""

    model_config = SettingsConfigDict(env_prefix="WARDEN_", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/warden"
    subject_prefix: str = Field(default="warden", pattern=r"^[A-Za-z0-9_-]+$")
    state_dir: Path = Path(".warden")
    # Commands over this size are rejected (and recorded). The streams' hard ceiling is larger,
    # so an oversized command is still stored and the rejection can point at it.
    max_command_bytes: int = Field(default=64 * 1024, gt=0)
    log_level: str = "INFO"
    log_format: str = Field(default="auto", pattern=r"^(auto|json|console)$")
