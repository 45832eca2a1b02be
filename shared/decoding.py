"""Bytes from the wire to a JSON document, refusing what any Warden reader could not hold safely.

Every reader (gate, scheduler, runner, projector, replay, client) decodes through here, so a
message is either a document all of them can handle or an `InvalidMessage` with a stable code,
never an exception nobody catches. The rules are I-JSON's (RFC 7493) plus what Postgres needs:

- UTF-8 JSON, no NaN or Infinity, no lone surrogates (`not_json`);
- at most `MAX_DEPTH` nested arrays and objects (`too_deep`): deeper documents exhaust
  recursion in parsers, serialisers and the policy engine;
- integers within ±(2**53 - 1) and finite numbers (`number_out_of_range`): the policy engine
  holds integers as doubles, so a larger integer is judged as a different number than the
  one the tool would get, and Python refuses to convert integers of thousands of digits;
- no U+0000 in strings (`invalid_string`): Postgres text and jsonb cannot store it.
"""

import math
import re
from typing import Any

import pydantic_core

from shared.errors import InvalidMessage, RejectionCode

# Deep enough for any real tool argument or result; pydantic-core's parser stops at about 200.
MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53 - 1

# Anything that could hold a value the rules refuse, found by a scan of the raw bytes: a run of
# 16 digits (every integer past 2**53 has one), a three-digit exponent (how a float overflows),
# NaN and Infinity, or an escaped NUL. Most messages have none of these and skip the walk.
_SUSPECT = re.compile(rb"[0-9]{16}|[0-9][eE][+-]?[0-9]{3}|NaN|Infinity|\\u0000")


def may_break_rules(raw: bytes) -> bool:
    """Whether `raw` might break a rule the parser does not check (False means it certainly does not).

    A document with no more than MAX_DEPTH brackets cannot nest deeper than that.
    """
    return _SUSPECT.search(raw) is not None or raw.count(b"{") + raw.count(b"[") > MAX_DEPTH


def _parse_error(exc: ValueError) -> InvalidMessage:
    text = str(exc)
    if "recursion limit exceeded" in text:
        return InvalidMessage(
            RejectionCode.TOO_DEEP, f"arrays and objects nested far more than {MAX_DEPTH} deep ({text})"
        )
    if "number out of range" in text:
        return InvalidMessage(RejectionCode.NUMBER_OUT_OF_RANGE, f"a number is out of range ({text})")
    return InvalidMessage(RejectionCode.NOT_JSON, f"body is not JSON (UTF-8, no NaN or Infinity): {text}")


def check_size(raw: bytes, max_bytes: int) -> None:
    if len(raw) > max_bytes:
        raise InvalidMessage(RejectionCode.TOO_LARGE, f"message is {len(raw)} bytes; the limit is {max_bytes}")


def decode_json(raw: bytes, *, max_bytes: int | None = None) -> Any:
    """Parse `raw` under the rules above, or raise `InvalidMessage` saying which one it broke."""
    if max_bytes is not None:
        check_size(raw, max_bytes)
    try:
        document = pydantic_core.from_json(raw, allow_inf_nan=False, cache_strings=False)
    except ValueError as exc:
        raise _parse_error(exc) from None
    if may_break_rules(raw):
        check_value(document)
    return document


def check_value(value: Any) -> None:
    """Raise `InvalidMessage` if a decoded JSON value holds a number or string the rules refuse.

    Also the check for values Warden itself is about to publish (a tool's result), so that
    nothing it writes is a message its own readers would refuse.
    """
    pending = [(value, 0)]  # (value, how many arrays and objects enclose it)
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidMessage(RejectionCode.INVALID_STRING, "a string contains U+0000, which cannot be stored")
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                raise InvalidMessage(
                    RejectionCode.NUMBER_OUT_OF_RANGE,
                    f"an integer is outside ±(2**53 - 1), the range every reader holds exactly "
                    f"({_describe_integer(item)})",
                )
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidMessage(RejectionCode.NUMBER_OUT_OF_RANGE, f"a number is not finite ({item})")
        elif isinstance(item, dict | list | tuple):
            if depth == MAX_DEPTH:
                raise InvalidMessage(RejectionCode.TOO_DEEP, f"arrays and objects nested more than {MAX_DEPTH} deep")
            members = [*item, *item.values()] if isinstance(item, dict) else item
            pending.extend((member, depth + 1) for member in members)


def recordable_text(text: str, limit: int) -> str:
    """Text taken from a hostile message (a header, a subject, an error), made safe to record:
    at most `limit` characters, no NUL, lone surrogates spelt out."""
    return text[:limit].replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode()


def _describe_integer(value: int) -> str:
    # str() of an integer of thousands of digits raises; its size is what a person needs anyway.
    digits = math.floor(abs(value).bit_length() * math.log10(2)) + 1
    return f"about {digits} digits" if digits > 30 else str(value)
