"""The JSON every Warden reader accepts, and the checks that keep out what some reader could not hold.

Every reader (gate, scheduler, runner, projector, replay, client) decodes through here and through
the message models, so a message is either one all of them can handle or an `InvalidMessage` with
a stable code, never an exception nobody catches. The rules, in the spirit of I-JSON (RFC 7493):

- UTF-8 JSON with no lone surrogates (`not_json`), nested no deeper than the parser allows
  (about 200 levels; `too_deep`);
- no U+0000 in any string (`invalid_string`): Postgres text and jsonb cannot store it;
- in a free-form value (a run's input, a tool's arguments or result, a run's output, checked by
  `check_value` as the models validate): at most `MAX_DEPTH` nested arrays and objects
  (`too_deep`), integers within ±(2**53 - 1) and finite numbers (`number_out_of_range`). The
  policy engine holds integers as doubles, so a larger integer would be judged as a number other
  than the one the tool gets; a number that overflows to infinity is stored and judged as null.

Typed fields carry their own bounds in the models. Checking only where a rule can be broken keeps
the common message at the cost of one parse.
"""

import math
from typing import Any

import pydantic_core

from warden.errors import InvalidMessage, RejectionCode

# Deep enough for any real tool argument or result, shallow enough for every serialiser and the
# policy engine; pydantic-core's parser stops whole documents at about 200.
MAX_DEPTH = 64
MAX_SAFE_INTEGER = 2**53 - 1
_NUL_ESCAPE = b"\\u0000"  # the only way U+0000 can appear in valid JSON


def may_hold_nul(raw: bytes) -> bool:
    """Whether a string in `raw` might hold U+0000 (False means none does)."""
    return _NUL_ESCAPE in raw


def check_size(raw: bytes, max_bytes: int) -> None:
    if len(raw) > max_bytes:
        raise InvalidMessage(RejectionCode.TOO_LARGE, f"message is {len(raw)} bytes; the limit is {max_bytes}")


def _parse_error(exc: ValueError) -> InvalidMessage:
    text = str(exc)
    if "recursion limit exceeded" in text:
        return InvalidMessage(RejectionCode.TOO_DEEP, f"arrays and objects are nested too deep ({text})")
    if "number out of range" in text:
        return InvalidMessage(RejectionCode.NUMBER_OUT_OF_RANGE, f"a number is out of range ({text})")
    return InvalidMessage(RejectionCode.NOT_JSON, f"body is not JSON (UTF-8): {text}")


def decode_json(raw: bytes, *, max_bytes: int | None = None) -> Any:
    """Parse `raw`, or raise `InvalidMessage` saying which rule it broke."""
    if max_bytes is not None:
        check_size(raw, max_bytes)
    try:
        document = pydantic_core.from_json(raw, cache_strings=False)
    except ValueError as exc:
        raise _parse_error(exc) from None
    if may_hold_nul(raw):
        check_strings(document)
    return document


def check_strings(value: Any) -> None:
    """Raise `InvalidMessage` if any string (or key) anywhere in a decoded value holds U+0000."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidMessage(RejectionCode.INVALID_STRING, "a string contains U+0000, which cannot be stored")
        elif isinstance(item, dict):
            pending += item
            pending += item.values()
        elif isinstance(item, list | tuple):
            pending += item


def check_value(value: Any) -> None:
    """Raise `InvalidMessage` if a free-form value breaks a rule: too deep, a number out of range, a NUL.

    The models run it on every free-form field, and the runner on a tool's result before
    recording it, so nothing Warden writes is a message its own readers would refuse.
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
                raise InvalidMessage(
                    RejectionCode.NUMBER_OUT_OF_RANGE, f"a number is not finite ({item}): it is not a JSON number"
                )
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
