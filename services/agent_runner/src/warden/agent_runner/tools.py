"""Built-in tools the agent runner can execute once the policy gate allows a call: small, deterministic, offline."""

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from urllib.parse import urlsplit

from pydantic import JsonValue

from warden.errors import PermanentError

Tool = Callable[[Mapping[str, JsonValue]], Awaitable[JsonValue]]

MAX_SLEEP_SECONDS = 30.0


class ToolError(PermanentError):
    """A tool refused its arguments or could not do its job; the message says which and why."""


class UnknownTool(ToolError):
    """No built-in tool has that name (a ToolError too, so the runner records it like any tool failure)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown tool {name!r}; built-in tools: {', '.join(sorted(BUILTIN_TOOLS))}")
        self.name = name


# --- Argument checks shared by the tools --------------------------------------------------------


def _expect_keys(tool: str, arguments: Mapping[str, JsonValue], *names: str, optional: tuple[str, ...] = ()) -> None:
    # Exactly these keys: a misspelt argument is an error, never silently ignored.
    missing = [name for name in names if name not in arguments]
    unexpected = sorted(key for key in arguments if key not in names and key not in optional)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected)}")
        raise ToolError(f"{tool}: {'; '.join(problems)} (takes {', '.join(names)})")


def _number(tool: str, arguments: Mapping[str, JsonValue], name: str) -> int | float:
    value = arguments[name]
    # bool is an int subclass in Python but not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ToolError(f"{tool}: argument {name!r} must be a finite number, got {value!r}")
    return value


def _text(tool: str, arguments: Mapping[str, JsonValue], name: str) -> str:
    value = arguments[name]
    if not isinstance(value, str):
        raise ToolError(f"{tool}: argument {name!r} must be a string, got {value!r}")
    return value


# --- The tools -------------------------------------------------------------------------------------


async def math_add(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`math.add`: {"a": number, "b": number} → their sum."""
    _expect_keys("math.add", arguments, "a", "b")
    total = _number("math.add", arguments, "a") + _number("math.add", arguments, "b")
    if not math.isfinite(total):
        raise ToolError(f"math.add: the sum overflows: {total}")
    return total


async def text_echo(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`text.echo`: {"text": string} → the same string."""
    _expect_keys("text.echo", arguments, "text")
    return _text("text.echo", arguments, "text")


async def clock_sleep(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`clock.sleep`: {"seconds": 0..30} → really waits that long, then {"slept": seconds}.

    It exists so tests can stop a service while a run is mid-step.
    """
    _expect_keys("clock.sleep", arguments, "seconds")
    seconds = _number("clock.sleep", arguments, "seconds")
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ToolError(f"clock.sleep: 'seconds' must be between 0 and {MAX_SLEEP_SECONDS:g}, got {seconds}")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


_EXAMPLE_DOMAIN = (
    "Example Domain. This domain is for use in illustrative examples in documents. "
    "You may use this domain in literature without prior coordination or asking for permission."
)

# (host, path) → (title, text). Short stand-ins written for this table, not copies of the real pages.
_OFFLINE_PAGES: Mapping[tuple[str, str], tuple[str, str]] = MappingProxyType(
    {
        ("docs.python.org", "/3/"): (
            "Python 3 documentation",
            "Welcome! This is the official documentation for Python 3: tutorial, library reference, "
            "language reference, and guides.",
        ),
        ("docs.python.org", "/3/library/asyncio.html"): (
            "asyncio — Asynchronous I/O",
            "asyncio is a library to write concurrent code using the async/await syntax.",
        ),
        ("docs.python.org", "/3/library/json.html"): (
            "json — JSON encoder and decoder",
            "The json module exposes an API to encode Python objects to JSON text and decode JSON text.",
        ),
    }
)


async def web_fetch(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`web.fetch`: {"url": http(s) URL, "authorization"?: header value} → {"url", "status", "title",
    "text", "offline": true}. The shipped policy marks `authorization` secret: it is recorded only
    as a keyed hash.

    OFFLINE: this build has no network access and tests must be deterministic, so it does not make
    an HTTP request. It answers from a small built-in table of pages: any path on example.com (the
    "Example Domain" page) and a few docs.python.org pages; every other URL raises `ToolError`.
    It is for demos and tests of the policy gate (which decides on the URL before this runs); a
    real HTTP fetch will be a separate tool.
    """
    _expect_keys("web.fetch", arguments, "url", optional=("authorization",))
    url = _text("web.fetch", arguments, "url")
    if "authorization" in arguments:
        _text("web.fetch", arguments, "authorization")  # offline: checked, then sent nowhere
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError as error:  # urlsplit rejects malformed hosts and ports
        raise ToolError(f"web.fetch: not a valid URL {url!r}: {error}") from error
    if parts.scheme not in ("http", "https") or not host:
        raise ToolError(f"web.fetch: expected an http or https URL, got {url!r}")
    path = parts.path or "/"
    if host in ("example.com", "www.example.com"):
        title, text = "Example Domain", _EXAMPLE_DOMAIN
    elif (host, path) in _OFFLINE_PAGES:
        title, text = _OFFLINE_PAGES[host, path]
    else:
        raise ToolError(f"web.fetch is offline in this build: no page for URL {url!r}")
    return {"url": url, "status": 200, "title": title, "text": text, "offline": True}


MAX_POST_BYTES = 64 * 1024


async def http_post(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`http.post`: {"url": http(s) URL, "body": string or JSON} → {"url", "status": 202, "bytes", "offline": true}.

    A tool that sends data out, for the policies that govern such tools (the shipped pack asks for
    a human once a run has read untrusted content). OFFLINE: this build has no network access, so
    nothing is sent; the URL and body are checked, and the answer says how much would have gone.
    """
    _expect_keys("http.post", arguments, "url", "body")
    url = _text("http.post", arguments, "url")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as error:
        raise ToolError(f"http.post: not a valid URL {url!r}: {error}") from error
    if parts.scheme not in ("http", "https") or not host:
        raise ToolError(f"http.post: expected an http or https URL, got {url!r}")
    body = arguments["body"]
    size = len((body if isinstance(body, str) else json.dumps(body)).encode())
    if size > MAX_POST_BYTES:
        raise ToolError(f"http.post: the body is {size} bytes, over {MAX_POST_BYTES}")
    return {"url": url, "status": 202, "bytes": size, "offline": True}


MAX_REFUND = 10_000


async def payments_refund(arguments: Mapping[str, JsonValue]) -> JsonValue:
    """`payments.refund`: {"order": string, "amount": number} → {"order", "amount", "status", "offline": true}.

    A tool with a real-world effect, for the policies that put a human in front of one (the shipped
    pack asks for approval). OFFLINE: no payment system is called; the arguments are checked and
    the answer says what would have been refunded.
    """
    _expect_keys("payments.refund", arguments, "order", "amount")
    order = _text("payments.refund", arguments, "order")
    amount = _number("payments.refund", arguments, "amount")
    if not 0 < amount <= MAX_REFUND:
        raise ToolError(f"payments.refund: the amount must be more than 0 and at most {MAX_REFUND}, got {amount}")
    return {"order": order, "amount": amount, "status": "refunded", "offline": True}


BUILTIN_TOOLS: Mapping[str, Tool] = MappingProxyType(
    {
        "math.add": math_add,
        "text.echo": text_echo,
        "clock.sleep": clock_sleep,
        "web.fetch": web_fetch,
        "http.post": http_post,
        "payments.refund": payments_refund,
    }
)


def _object(properties: dict[str, JsonValue], *required: str) -> dict[str, JsonValue]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


# What a model is told of each built-in tool: a description and a JSON Schema of its arguments.
BUILTIN_TOOL_SCHEMAS: Mapping[str, tuple[str, dict[str, JsonValue]]] = MappingProxyType(
    {
        "math.add": ("Add two numbers.", _object({"a": {"type": "number"}, "b": {"type": "number"}}, "a", "b")),
        "text.echo": ("Return the given text unchanged.", _object({"text": {"type": "string"}}, "text")),
        "clock.sleep": (
            f"Wait the given number of seconds (0 to {MAX_SLEEP_SECONDS:g}).",
            _object({"seconds": {"type": "number", "minimum": 0, "maximum": MAX_SLEEP_SECONDS}}, "seconds"),
        ),
        "web.fetch": (
            "Fetch a web page by URL and return its title and text.",
            _object({"url": {"type": "string", "description": "An http or https URL."}}, "url"),
        ),
        "http.post": (
            "Send data to a URL with an HTTP POST.",
            _object({"url": {"type": "string"}, "body": {"type": ["string", "object"]}}, "url", "body"),
        ),
        "payments.refund": (
            "Refund an amount of an order to the customer.",
            _object(
                {"order": {"type": "string"}, "amount": {"type": "number", "exclusiveMinimum": 0}}, "order", "amount"
            ),
        ),
    }
)
assert set(BUILTIN_TOOL_SCHEMAS) == set(BUILTIN_TOOLS), "every built-in tool is described to models"


async def run_tool(name: str, arguments: Mapping[str, JsonValue]) -> JsonValue:
    """Run the built-in tool `name`: `UnknownTool` for a name not in `BUILTIN_TOOLS`, `ToolError` on bad input."""
    tool = BUILTIN_TOOLS.get(name)
    if tool is None:
        raise UnknownTool(name)
    return await tool(arguments)
