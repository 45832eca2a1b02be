"""The gate's pure intake check: raw command bytes become a typed envelope or a recorded rejection."""

import re
from collections.abc import Mapping
from typing import Any

from shared.bus import MSG_ID_HEADER, TYPE_HEADER
from shared.errors import InvalidMessage
from shared.messages import CommandRejected, Envelope, decode_document, parse_envelope
from shared.subjects import Subjects

# Rejections need a tenant for their subject; a subject whose tenant token is not a valid tenant
# id (characters NATS allows but Warden does not) is filed under this tenant instead of being lost.
UNATTRIBUTED_TENANT = "_unattributed"
_TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_command(
    subjects: Subjects,
    *,
    nats_subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    stream_seq: int,
    max_bytes: int,
) -> Envelope[Any] | CommandRejected:
    """Return the command's envelope if it may be acted on, else the rejection to record.

    An event envelope sent to a command subject fails the subject check, so only commands pass.
    """
    try:
        envelope = parse_envelope(data, max_bytes=max_bytes, type_hint=(headers or {}).get(TYPE_HEADER))
        subjects.check_envelope_subject(envelope, nats_subject)
    except InvalidMessage as exc:
        # The rejection names the command's type and id when its body has them.
        document = _document_or_none(data)
        type_name = document.get("type") if document else None
        command_id = document.get("id") if document else None
        return CommandRejected(
            code=exc.code.value,
            reason=exc.reason,
            command_subject=nats_subject,
            command_stream_seq=stream_seq,
            command_type=type_name if isinstance(type_name, str) else None,
            command_id=command_id if isinstance(command_id, str) else None,
            idempotency_key=(headers or {}).get(MSG_ID_HEADER),
            size_bytes=len(data),
        )
    return envelope


def _document_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        return decode_document(data)
    except InvalidMessage:
        return None


def rejection_tenant(subjects: Subjects, nats_subject: str) -> str:
    tenant = subjects.tenant_of(nats_subject)
    return tenant if _TENANT.match(tenant) else UNATTRIBUTED_TENANT
