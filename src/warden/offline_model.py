"""An offline, OpenAI-compatible Chat Completions server whose deterministic model obeys directives in its input.

The demo, the tests and the benchmark drive `llm` agents through the official `openai` SDK with no
network and no real model. This server answers the same HTTP API as OpenAI's, with its validation,
error bodies and status codes, so the SDK raises, retries and backs off exactly as it would against
the real service; and its model does what the latest input tells it to.

The model reads directive lines in the *trailing input* only: the last message if it is a `user`
message, or the trailing run of `tool` messages (the results of its previous turn's tool calls).
Older turns and the system prompt are never obeyed, so once tool results come back without
directives, the model finishes. A directive is a line whose first word is one of these:

    CALL <function> <json object>   call a tool with exactly this arguments text; several lines make
                                    several calls in one turn, in order
    CALL_RAW <function> <text>      call a tool whose `arguments` string is <text> verbatim (malformed JSON)
    ANSWER <text>                   answer <text> (several lines are joined by newlines)
    REFUSE <text>                   refuse: `message.refusal` is <text>, `content` is null
    ERROR <status> [times]          answer HTTP <status> (400-599) to the first `times` (default 1)
                                    requests with these exact messages; several lines run one after
                                    the other
    SLEEP <seconds>                 wait that long before answering (at most 120 s in all)
    LENGTH                          end with finish_reason "length"

The model is obedient and gullible: it calls a function whether or not it is among the offered
`tools`, which is what prompt-injection drills need. A line that starts with a directive word but
does not parse (a tool's output saying `ERROR file not found`) is ordinary text. With no CALL, ANSWER
or REFUSE, the answer is "Done: " and the start of the trailing input's ordinary text.

Run standalone with `python -m warden.offline_model --port N [--api-key-env VAR]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DEFAULT_MODEL = "warden-test-model"

# What the real API accepts as a tool's name. Dots are refused there, so a tool naming scheme that
# works offline but not against OpenAI must fail here too.
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_FUNCTION_NAME_MAX = 64
_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_TOOL_TYPES = ("function", "custom")

_SLEEP_MAX = 120.0
# How often a SLEEP looks up from its nap: a client that timed out, or a server stopping, ends it.
_SLEEP_POLL = 0.05
_ECHO_CHARS = 200
_CHARS_PER_TOKEN = 4
# The SDK prefers `retry-after-ms` and honours any delay in (0, 120] s; a short one keeps drills fast.
_RETRY_AFTER_MS = "50"
_MODEL_CREATED = 1_700_000_000  # models carry a fixed date: the list is deterministic
_STOP_GRACE_SECONDS = 5

# Each directive's whole line (stripped); a line that starts with the word but does not match is text.
_DIRECTIVES: dict[str, re.Pattern[str]] = {
    "CALL": re.compile(r"CALL\s+(\S+)\s+(.+)"),
    "CALL_RAW": re.compile(r"CALL_RAW\s+(\S+)(?:\s+(.*))?"),
    "ANSWER": re.compile(r"ANSWER(?:\s+(.*))?"),
    "REFUSE": re.compile(r"REFUSE(?:\s+(.*))?"),
    "ERROR": re.compile(r"ERROR\s+([45]\d\d)(?:\s+(\d{1,6}))?"),
    "SLEEP": re.compile(r"SLEEP\s+(\d+(?:\.\d*)?|\.\d+)"),
    "LENGTH": re.compile(r"LENGTH"),
}


class _ApiError(Exception):
    """An answer in OpenAI's error shape: the SDK maps its status to an exception class and reads the body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return _json_response(body, status=self.status, headers=self.headers)


def _json_response(body: object, *, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # The SDK exposes x-request-id as `request_id` on responses and errors, as the real API sends it.
    return JSONResponse(
        body, status_code=status, headers={"x-request-id": f"req_{uuid.uuid4().hex}", **(headers or {})}
    )


def _json_type(value: object) -> str:
    """How the real API names a JSON value's type in its error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _invalid(message: str, param: str | None = None, code: str | None = None) -> _ApiError:
    return _ApiError(400, message, param=param, code=code)


def _missing(param: str) -> _ApiError:
    return _invalid(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


def _wrong_type(param: str, expected: str, value: object) -> _ApiError:
    return _invalid(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.", param, "invalid_type"
    )


# --- the request -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chat:
    """A validated chat completion request: what the model reads."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int | None  # the lower of max_tokens and max_completion_tokens


def _read_chat(body: object, models: Sequence[str]) -> _Chat:
    """Validate a request body the way the real API does, in the same order, with the same messages."""
    if not isinstance(body, dict):
        raise _invalid(f"Invalid type for request body: expected an object, but got {_json_type(body)} instead.")
    model = body.get("model")
    if model is None:
        raise _invalid("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if "messages" not in body:
        raise _missing("messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _wrong_type("messages", "an array", messages)
    if not messages:
        raise _invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
            "empty_array",
        )
    _check_messages(messages)
    tools = body.get("tools")
    if tools is not None:
        _check_tools(tools)
    stream = body.get("stream")
    if stream is True:
        raise _invalid(
            "Streaming is not supported by this offline model: call without stream=True.", "stream", "unsupported_value"
        )
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", "a boolean", stream)
    if body.get("n") not in (None, 1):
        raise _invalid("This offline model answers with one choice: 'n' must be 1.", "n", "unsupported_value")
    limits = [_token_limit(body, name) for name in ("max_tokens", "max_completion_tokens")]
    given = [limit for limit in limits if limit is not None]
    if model not in models:
        raise _ApiError(
            404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
        )
    return _Chat(model, messages, tools, min(given) if given else None)


def _token_limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, "an integer", value)
    if value < 1:
        raise _invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    return value


def _check_messages(messages: list[Any]) -> None:
    """Each message well formed, every tool call answered by tool messages right after it: what the real API demands."""
    unanswered: list[str] = []  # the last assistant message's tool calls that no tool message answered yet
    offered: set[str] | None = None  # its tool call ids; None where a tool message cannot follow
    asked_at = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _wrong_type(where, "an object", message)
        role = message.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if role not in _ROLES:
            supported = ", ".join(f"'{r}'" for r in _ROLES)
            raise _invalid(
                f"Invalid value: '{role}'. Supported values are: {supported}.", f"{where}.role", "invalid_value"
            )
        _check_content(message.get("content"), f"{where}.content", required=role not in ("assistant", "function"))
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _missing(f"{where}.tool_call_id")
            if offered is None:
                raise _invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                    "'tool_calls'.",
                    f"messages.[{i}].role",
                )
            if call_id not in offered:
                raise _invalid(
                    f"Invalid parameter: 'tool_call_id' of '{call_id}' not found in 'tool_calls' of previous message.",
                    f"messages.[{i}].tool_call_id",
                )
            if call_id in unanswered:
                unanswered.remove(call_id)
            continue
        _check_answered(unanswered, asked_at)
        offered = None
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            unanswered = _check_tool_calls(calls, f"{where}.tool_calls")
            offered, asked_at = set(unanswered), i
    _check_answered(unanswered, asked_at)


def _check_answered(unanswered: list[str], asked_at: int) -> None:
    if unanswered:
        raise _invalid(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(unanswered)}",
            f"messages.[{asked_at}].role",
        )


def _check_content(content: object, param: str, *, required: bool) -> None:
    if content is None:
        if required:
            raise _missing(param)
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _wrong_type(param, "one of a string or array of objects", content)
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise _wrong_type(f"{param}[{j}]", "an object", part)
        if "type" not in part:
            raise _missing(f"{param}[{j}].type")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _missing(f"{param}[{j}].text")


def _check_tool_calls(calls: object, param: str) -> list[str]:
    """An assistant message's tool calls well formed; their ids, in order."""
    if not isinstance(calls, list):
        raise _wrong_type(param, "an array", calls)
    if not calls:
        raise _invalid(
            f"Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param,
            "empty_array",
        )
    ids: list[str] = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        if not isinstance(call, dict):
            raise _wrong_type(where, "an object", call)
        call_id = call.get("id")
        if not isinstance(call_id, str):
            raise _missing(f"{where}.id")
        kind = call.get("type")
        if kind not in _TOOL_TYPES:
            raise _invalid(f"Invalid value: '{kind}'. Supported values are: 'function' and 'custom'.", f"{where}.type")
        if kind == "function":
            function = call.get("function")
            if not isinstance(function, dict):
                raise _missing(f"{where}.function")
            for key in ("name", "arguments"):
                if not isinstance(function.get(key), str):
                    raise _missing(f"{where}.function.{key}")
        ids.append(call_id)
    return ids


def _check_tools(tools: object) -> None:
    if not isinstance(tools, list):
        raise _wrong_type("tools", "an array", tools)
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _wrong_type(where, "an object", tool)
        kind = tool.get("type")
        if kind is None:
            raise _missing(f"{where}.type")
        if kind not in _TOOL_TYPES:
            raise _invalid(f"Invalid value: '{kind}'. Supported values are: 'function' and 'custom'.", f"{where}.type")
        spec = tool.get(kind)
        if not isinstance(spec, dict):
            raise _missing(f"{where}.{kind}")
        name = spec.get("name")
        if name is None:
            raise _missing(f"{where}.{kind}.name")
        if not isinstance(name, str):
            raise _wrong_type(f"{where}.{kind}.name", "a string", name)
        _check_function_name(name, f"{where}.{kind}.name")


def _check_function_name(name: str, param: str) -> None:
    if not name:
        raise _invalid(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, "
            "but got an empty string instead.",
            param,
            "empty_string",
        )
    if len(name) > _FUNCTION_NAME_MAX:
        raise _invalid(
            f"Invalid '{param}': string too long. Expected a string with maximum length {_FUNCTION_NAME_MAX}, "
            f"but got a string with length {len(name)} instead.",
            param,
            "string_above_max_length",
        )
    if not _FUNCTION_NAME.fullmatch(name):
        raise _invalid(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches the pattern "
            f"'^{_FUNCTION_NAME.pattern}$'.",
            param,
            "invalid_value",
        )


# --- the model -------------------------------------------------------------------------------------


@dataclass
class _Script:
    """What the directives in the trailing input tell the model to do."""

    calls: list[tuple[str, str]] = field(default_factory=list)  # (function name, arguments text)
    answers: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)  # the status of each scripted failure, in order
    sleep: float = 0.0
    length: bool = False
    text: list[str] = field(default_factory=list)  # the lines that are not directives


def _read_script(text: str) -> _Script:
    script = _Script()
    for line in text.splitlines():
        if not _obey(line, script):
            script.text.append(line)
    return script


def _obey(line: str, script: _Script) -> bool:
    """Add the line's directive to the script; False if the line is ordinary text."""
    word = next(iter(line.split(maxsplit=1)), "")
    pattern = _DIRECTIVES.get(word)
    # CALL_RAW is matched on the line as written (but for its indentation): its arguments are verbatim.
    found = pattern.fullmatch(line.lstrip() if word == "CALL_RAW" else line.strip()) if pattern else None
    if found is None:
        return False
    match word:
        case "CALL":
            if not _is_json_object(found[2]):
                return False
            script.calls.append((found[1], found[2]))
        case "CALL_RAW":
            script.calls.append((found[1], found[2] or ""))
        case "ANSWER":
            script.answers.append(found[1] or "")
        case "REFUSE":
            script.refusals.append(found[1] or "")
        case "ERROR":
            script.errors.extend([int(found[1])] * int(found[2] or 1))
        case "SLEEP":
            script.sleep = min(script.sleep + float(found[1]), _SLEEP_MAX)
        case _:
            script.length = True
    return True


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _text(content: object) -> str:
    """A message's text: a string content, or its text parts one per line (images and audio say nothing here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def _trailing_input(messages: list[dict[str, Any]]) -> str:
    """The only text the model obeys: the last user message, or the tool results that end the conversation."""
    if messages[-1]["role"] == "user":
        return _text(messages[-1].get("content"))
    results: list[str] = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        results.append(_text(message.get("content")))
    return "\n".join(reversed(results))


def _tokens(chars: int) -> int:
    return max(1, -(-chars // _CHARS_PER_TOKEN))


def _message_text(message: dict[str, Any]) -> str:
    """What the model reads of a message: its text, and the names and arguments of the tool calls it made."""
    functions = [call.get("function") for call in message.get("tool_calls") or [] if isinstance(call, dict)]
    called = [
        f"{function.get('name', '')}{function.get('arguments', '')}"
        for function in functions
        if isinstance(function, dict)
    ]
    return _text(message.get("content")) + "".join(called)


def _prompt_tokens(chat: _Chat) -> int:
    tokens = sum(_tokens(len(_message_text(message))) for message in chat.messages)
    if chat.tools:
        tokens += _tokens(len(json.dumps(chat.tools)))
    return tokens


def _digest(messages: list[dict[str, Any]]) -> str:
    """The same for identical messages (an SDK retry sends the very same), whatever their keys' order."""
    canonical = json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class _Output:
    """The model's reply, before it takes the shape of a chat.completion."""

    content: str | None
    refusal: str | None
    calls: list[tuple[str, str]]
    finish_reason: str

    def chars(self) -> int:
        return len(self.content or "") + len(self.refusal or "") + sum(len(n) + len(a) for n, a in self.calls)

    def cut(self, max_chars: int) -> None:
        """Stop where a model out of tokens would: mid-content, mid-refusal or mid-arguments."""
        left = max_chars

        def take(text: str) -> str:
            nonlocal left
            kept = text[: max(left, 0)]
            left -= len(kept)
            return kept

        if self.content is not None:
            self.content = take(self.content)
        if self.refusal is not None:
            self.refusal = take(self.refusal)
        calls: list[tuple[str, str]] = []
        for name, arguments in self.calls:
            if left <= 0:
                break
            left -= len(name)  # a name is written whole or not at all
            calls.append((name, take(arguments)))
        self.calls = calls
        self.finish_reason = "length"


def _decide(script: _Script) -> _Output:
    """REFUSE wins over everything; CALL lines make tool calls (with ANSWER text as content, if any); then ANSWER."""
    if script.refusals:
        return _Output(None, "\n".join(script.refusals), [], "length" if script.length else "stop")
    answer = "\n".join(script.answers) if script.answers else None
    if script.calls:
        return _Output(answer, None, list(script.calls), "length" if script.length else "tool_calls")
    if answer is None:
        echo = " ".join(" ".join(script.text).split())[:_ECHO_CHARS]
        answer = f"Done: {echo}" if echo else "Done."
    return _Output(answer, None, [], "length" if script.length else "stop")


def _completion(chat: _Chat, script: _Script, digest: str) -> dict[str, Any]:
    output = _decide(script)
    if chat.max_tokens is not None and output.chars() > chat.max_tokens * _CHARS_PER_TOKEN:
        output.cut(chat.max_tokens * _CHARS_PER_TOKEN)
    completion_tokens = _tokens(output.chars())
    if chat.max_tokens is not None:
        completion_tokens = min(completion_tokens, chat.max_tokens)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": output.content,
        "refusal": output.refusal,
        "annotations": [],
    }
    if output.calls:
        # Deterministic ids, distinct per conversation and per call, in OpenAI's "call_" + 24 characters form.
        message["tool_calls"] = [
            {
                "id": "call_" + hashlib.sha256(f"{digest}:{index}".encode()).hexdigest()[:24],
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for index, (name, arguments) in enumerate(output.calls)
        ]
    prompt_tokens = _prompt_tokens(chat)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": output.finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
        "service_tier": "default",
        "system_fingerprint": None,
    }


def _drill_error(status: int) -> _ApiError:
    """The error an `ERROR <status>` directive asks for, shaped as the real API's for that status."""
    told = f"(the offline model was told: ERROR {status})"
    if status == 429:
        return _ApiError(
            429,
            f"Rate limit reached for requests {told}.",
            kind="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"retry-after-ms": _RETRY_AFTER_MS, "retry-after": "0"},
        )
    if status >= 500:
        return _ApiError(status, f"The server had an error while processing your request {told}.", kind="server_error")
    if status == 401:
        return _ApiError(401, f"Incorrect API key provided {told}.", code="invalid_api_key")
    return _ApiError(status, f"Invalid request {told}.")


# --- the server ------------------------------------------------------------------------------------


class _EmbeddedUvicorn(uvicorn.Server):
    """A uvicorn server that leaves signals to the program it runs in."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own takes SIGINT and SIGTERM for the whole process while it serves, and raises
        # them again once stopped: embedded in a test session or a CLI, that is not its business.
        yield


class OfflineModelServer:
    """The offline model behind an OpenAI-compatible HTTP API; an async context manager that serves while open.

    `port=0` lets the system pick a free port; `base_url` (".../v1", what `openai.AsyncOpenAI` takes)
    is valid once started. With `api_key`, requests must carry `Authorization: Bearer <api_key>`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Sequence[str] = (DEFAULT_MODEL,),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not models:
            raise ValueError("the offline model server needs at least one model name")
        self.models = tuple(models)
        self.host = host
        self.port = port
        self.requests = 0  # chat completion requests answered so far, error answers included
        self._api_key = api_key
        self._failures: dict[str, int] = {}  # scripted errors answered so far, per digest of the messages
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._base_url: str | None = None
        self._app = Starlette(
            routes=[
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model}", self._get_model, methods=["GET"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
            ],
            exception_handlers={
                _ApiError: self._on_api_error,
                HTTPException: self._on_http_error,
                Exception: self._on_bug,
            },
        )

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the offline model server is not started")
        return self._base_url

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the offline model server is already started")
        config = uvicorn.Config(
            self._app,
            host=self.host,
            port=self.port,
            http="h11",  # pure Python, always there: the same parser wherever this runs
            ws="none",
            lifespan="off",
            log_config=None,  # leave the host program's logging configuration alone
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=_STOP_GRACE_SECONDS,
        )
        server = _EmbeddedUvicorn(config)
        task = asyncio.create_task(self._serve(server), name="offline-model-server")
        try:
            # uvicorn has no start event to await: its `started` flag turns on once it listens.
            while not server.started:
                if task.done():
                    await task
                    raise RuntimeError("the offline model server stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            task.cancel()
            await asyncio.wait([task])
            raise
        port = server.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._server, self._task = server, task
        self._base_url = f"http://{host}:{port}/v1"

    async def _serve(self, server: uvicorn.Server) -> None:
        try:
            await server.serve()
        except SystemExit as exc:
            # uvicorn exits the process when it cannot listen (a port taken); embedded, that is
            # start()'s error to raise, and no reason for the program around it to end.
            raise OSError(f"the offline model server cannot listen on {self.host}:{self.port}") from exc

    async def stop(self) -> None:
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await task
        finally:
            self._server = self._task = self._base_url = None

    async def __aenter__(self) -> OfflineModelServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- endpoints ---

    def _authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(token.encode(), self._api_key.encode()):
            raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    @staticmethod
    def _model_object(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": _MODEL_CREATED, "owned_by": "warden"}

    async def _list_models(self, request: Request) -> Response:
        self._authorize(request)
        return _json_response({"object": "list", "data": [self._model_object(model) for model in self.models]})

    async def _get_model(self, request: Request) -> Response:
        self._authorize(request)
        model = request.path_params["model"]
        if model not in self.models:
            raise _ApiError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        return _json_response(self._model_object(model))

    async def _chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, RecursionError):
                raise _invalid(
                    "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload, but "
                    "what was sent was not valid JSON."
                ) from None
            chat = _read_chat(body, self.models)
            script = _read_script(_trailing_input(chat.messages))
            if script.sleep > 0:
                await self._sleep(script.sleep, request)
            digest = _digest(chat.messages)
            status = self._next_failure(digest, script.errors)
            if status is not None:
                raise _drill_error(status)
            return _json_response(_completion(chat, script, digest))
        finally:
            self.requests += 1

    async def _sleep(self, seconds: float, request: Request) -> None:
        """Wait, but no longer than the client does, nor past the server's stop (it would wait for this answer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            if (self._server is not None and self._server.should_exit) or await request.is_disconnected():
                return
            await asyncio.sleep(min(left, _SLEEP_POLL))

    def _next_failure(self, digest: str, schedule: list[int]) -> int | None:
        """The status the next identical request must fail with, if the ERROR directives ask for one more."""
        answered = self._failures.get(digest, 0)
        if answered >= len(schedule):
            return None
        self._failures[digest] = answered + 1
        return schedule[answered]

    @staticmethod
    async def _on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _ApiError)
        return exc.response()

    @staticmethod
    async def _on_http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods: the real API answers them in its error shape too.
        assert isinstance(exc, HTTPException)
        error = _ApiError(
            exc.status_code, f"Invalid URL ({request.method} {request.url.path})", headers=dict(exc.headers or {})
        )
        return error.response()

    @staticmethod
    async def _on_bug(request: Request, exc: Exception) -> Response:
        # A bug here still answers in OpenAI's shape, so the SDK reports an InternalServerError, not a parse error.
        return _ApiError(500, f"The offline model failed: {exc!r}", kind="server_error").response()


# --- the command -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the offline model until SIGINT or SIGTERM; the first line printed is its base URL."""
    parser = argparse.ArgumentParser(
        prog="python -m warden.offline_model",
        description="Serve Warden's offline, directive-obeying model over the OpenAI Chat Completions API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: 0, a free one)")
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="require the API key held in this environment variable (never on argv)"
    )
    parser.add_argument(
        "--model", action="append", dest="models", metavar="NAME", help=f"a model to serve (default: {DEFAULT_MODEL})"
    )
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"the environment variable {args.api_key_env} is not set")
    server = OfflineModelServer(api_key=api_key, models=args.models or (DEFAULT_MODEL,), host=args.host, port=args.port)
    try:
        asyncio.run(_serve_until_signalled(server))
    except OSError as exc:
        print(f"offline model: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(server: OfflineModelServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        print(server.base_url, flush=True)
        await stop.wait()


if __name__ == "__main__":
    raise SystemExit(main())
