"""Warden's error hierarchy: every failure is either worth retrying or permanent, never ambiguous."""

from enum import StrEnum


class WardenError(Exception):
    """Root of every error Warden raises on purpose."""


class RetryableError(WardenError):
    """A transient failure (a server is down, a timeout): the same input may succeed later."""


class PermanentError(WardenError):
    """A failure the same input can never get past: record it and stop trying."""


class RejectionCode(StrEnum):
    """Why a command was refused before anything acted on it (stable values: they are stored)."""

    NOT_JSON = "not_json"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    NUMBER_OUT_OF_RANGE = "number_out_of_range"
    INVALID_STRING = "invalid_string"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA_INVALID = "schema_invalid"
    SUBJECT_MISMATCH = "subject_mismatch"
    # The command names another actor than the one whose credential sent it (the subject says).
    ACTOR_MISMATCH = "actor_mismatch"
    IDEMPOTENCY_KEY_OUT_OF_SCOPE = "idempotency_key_out_of_scope"
    # The gate failed on the command itself (a bug it exposed): refused at once, never retried.
    UNPROCESSABLE = "unprocessable"


class InvalidMessage(PermanentError):
    """A message that is not a valid Warden envelope; `code` says which rule it broke."""

    def __init__(self, code: RejectionCode, reason: str) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason
