"""The record of a bundle a gate decides under: the `policy.activated` event, its key and its size check."""

from typing import Any, Literal

from warden.messages import Envelope, PolicyActivated, make_envelope
from warden.policy_bundle import PolicyBundleError, revision_token
from warden.policy_gate.engine import PolicyEngine
from warden.streams import STREAM_MAX_MSG_BYTES
from warden.subjects import SYSTEM_TENANT

SERVICE = "policy-gate"


class BundleTooLarge(PolicyBundleError):
    """A bundle whose `policy.activated` event would exceed the events stream's message size."""


def activation(
    engine: PolicyEngine,
    *,
    cause: Literal["start", "promote", "rollback"],
    activated_by: str,
    origin: str,
    reason: str = "",
    previous_revision: str | None = None,
    lifecycle_seq: int | None = None,
) -> tuple[Envelope[PolicyActivated], str]:
    """The event that records `engine`'s bundle going into force, and its idempotency key.

    The key names the revision, the cause and the lifecycle event that caused it (none at a start
    from the configured directory), not the gate: every gate of a queue group that activates the
    same bundle for the same reason within the events stream's duplicate window makes one event.
    Raises `BundleTooLarge` when the event would not fit in the stream (the bundle is refused:
    a revision whose files are not on the record could not be evaluated again).
    """
    event = make_envelope(
        PolicyActivated(
            revision=engine.revision,
            files=dict(engine.bundle.files),
            cause=cause,
            activated_by=activated_by,
            reason=reason,
            origin=origin,
            previous_revision=previous_revision,
        ),
        tenant=SYSTEM_TENANT,
        entity_id=revision_token(engine.revision),
        actor=SERVICE,
        source=SERVICE,
    )
    size = len(event.to_bytes())
    if size > STREAM_MAX_MSG_BYTES:
        raise BundleTooLarge(
            f"policy bundle {engine.revision} ({origin}) is {size} bytes as a policy.activated event; the events "
            f"stream takes at most {STREAM_MAX_MSG_BYTES}: make the bundle smaller (its data, most likely)"
        )
    key = f"policy-activated-{revision_token(engine.revision)}-{cause}-{lifecycle_seq or 0}"
    return event, key


def describe(event: Envelope[Any]) -> dict[str, Any]:
    """What a log line says of an activation."""
    data = event.data
    assert isinstance(data, PolicyActivated)
    return {"revision": data.revision, "cause": data.cause, "origin": data.origin, "files": len(data.files)}
