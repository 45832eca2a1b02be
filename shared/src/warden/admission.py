"""Whether a command may be acted on: the one judgement the policy gate records and the projector applies.

Both judge the same stored bytes by the same rules, so a command the gate rejects never shapes a
read model, and every command it decides on does. The rules depend only on the message (its
subject, headers and bytes) and the installation's size limit, never on policy data: a request
the policies refuse is decided (a deny), not rejected.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warden.decoding import check_size, recordable_text
from warden.errors import InvalidMessage, RejectionCode
from warden.messages import CommandRejected, Envelope, decode_document, parse_envelope
from warden.subjects import Subjects
from warden.wire import MSG_ID_HEADER, TYPE_HEADER, command_key_scope


@dataclass(frozen=True)
class CommandRules:
    """The admission rules of one installation: its subjects and its command size limit."""

    subjects: Subjects
    max_bytes: int

    def admit(self, nats_subject: str, data: bytes, headers: Mapping[str, str] | None) -> Envelope[Any]:
        """The command's envelope, or `InvalidMessage` saying which rule it broke.

        An event envelope sent to a command subject fails the subject check, so only commands pass.
        """
        check_size(data, self.max_bytes)
        envelope = parse_envelope(data, type_hint=(headers or {}).get(TYPE_HEADER))
        self.subjects.check_envelope_subject(envelope, nats_subject)
        check_key_scope(envelope, headers)
        return envelope

    def judge(
        self, nats_subject: str, data: bytes, headers: Mapping[str, str] | None, stream_seq: int
    ) -> Envelope[Any] | CommandRejected:
        """The command's envelope if it may be acted on, else the rejection to record."""
        try:
            return self.admit(nats_subject, data, headers)
        except InvalidMessage as exc:
            return rejection(nats_subject, data, headers, stream_seq, code=exc.code, reason=exc.reason)


def check_key_scope(command: Envelope[Any], headers: Mapping[str, str] | None) -> None:
    """Refuse a command whose Nats-Msg-Id is not scoped by its own tenant and type (see warden.bus)."""
    key = (headers or {}).get(MSG_ID_HEADER)
    scope = command_key_scope(command.tenant, command.type)
    if key is not None and not key.startswith(scope):
        raise InvalidMessage(
            RejectionCode.IDEMPOTENCY_KEY_OUT_OF_SCOPE,
            f"the Nats-Msg-Id {key[:200]!r} must start with {scope!r}: JetStream deduplicates keys across "
            "tenants, so an unscoped key could collide with (or squat) another tenant's",
        )


def rejection(
    nats_subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    stream_seq: int,
    *,
    code: RejectionCode,
    reason: str,
) -> CommandRejected:
    """A rejection of the command stored at `stream_seq`, naming its type and id when its body has them."""
    document = _document_or_none(data)
    type_name = document.get("type") if document else None
    command_id = document.get("id") if document else None
    key = (headers or {}).get(MSG_ID_HEADER)
    return CommandRejected(
        code=code.value,
        reason=recordable_text(reason, 2000),
        command_subject=recordable_text(nats_subject, 1024),
        command_stream_seq=stream_seq,
        command_type=recordable_text(type_name, 200) if isinstance(type_name, str) else None,
        command_id=recordable_text(command_id, 200) if isinstance(command_id, str) else None,
        idempotency_key=recordable_text(key, 1024) if key is not None else None,
        size_bytes=len(data),
    )


def _document_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        return decode_document(data)
    except InvalidMessage:
        return None
