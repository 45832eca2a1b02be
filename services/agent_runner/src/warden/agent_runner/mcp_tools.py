"""Warden's connection to MCP tool servers: a tenant's configured servers, their tools as Warden tools, bounded calls.

Configuration is one JSON file for all tenants (see `ToolServersConfig`)::

    {"tenants": {"acme": {"servers": {
        "time":  {"transport": "stdio", "command": "/usr/bin/python3", "args": ["-m", "mcp_server_time"],
                  "env": {}, "timeout_seconds": 30, "max_result_bytes": 262144},
        "notes": {"transport": "streamable_http", "url": "http://127.0.0.1:8765/mcp", "headers": {}}
    }}}}

A server's tools become Warden tools named `<server>.<tool>`. `McpToolbox` holds the sessions to one
tenant's servers; every request to a server is bounded by that server's `timeout_seconds`, and a
session that timed out or lost its server is dropped and opened again on the next call.
"""

import asyncio
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal, Self, TextIO, TypeVar, cast
from urllib.parse import urlsplit

import httpx2
import structlog
from mcp import Client, Implementation, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import DEFAULT_MAX_SSE_EVENT_SIZE, streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CONNECTION_CLOSED,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    CallToolResult,
    RequestParamsMeta,
    TextContent,
    Tool,
)
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError, field_validator

from warden.agent_runner.tools import ToolError
from warden.errors import PermanentError
from warden.messages import TenantId, describe_validation_error

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

SERVER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
DEFAULT_TIMEOUT_SECONDS = 30.0
# Where a call's idempotency key (Warden's tool call id) travels in the MCP request's `_meta`.
IDEMPOTENCY_META_KEY = "dev.warden/idempotency-key"
DEFAULT_MAX_RESULT_BYTES = 256 * 1024

# Closing a session: the SDK stops a stdio server by closing its stdin, then SIGTERM after 2 s and
# SIGKILL after 2 s more (about 6.5 s at worst); an HTTP session ends with a DELETE that a hung
# server may never answer. Past the grace the session's task is cancelled, and past that abandoned.
_CLOSE_GRACE_SECONDS = 8.0
_CANCEL_GRACE_SECONDS = 2.0
# An HTTP server may hold its event stream open between messages; each request is bounded by
# `timeout_seconds` above the HTTP layer, so the socket read timeout only has to catch a dead peer.
_HTTP_STREAM_READ_TIMEOUT_SECONDS = 300.0
# A tool listing split into more pages than this is a server that never stops paginating.
_MAX_LISTING_PAGES = 100
_STDERR_TAIL_BYTES = 2000
_ERROR_TEXT_LIMIT = 2000


class ToolServerConfigError(PermanentError):
    """The tool server configuration file cannot be read or is not valid; the message names the file and field."""


class ToolServerError(ToolError):
    """A tool server is not there, crashed, timed out, answered with an error, or answered too much.

    The message says which server (and tool, if any) and what happened. `transient`: the server
    could not be reached, crashed or did not answer in time, so the same call may work if tried
    again (on a fresh session); an error the tool itself reported, or a result that was too large,
    would come back the same.
    """

    def __init__(self, server: str, problem: str, *, tool: str | None = None, transient: bool = False) -> None:
        where = f"MCP tool server {server!r}" + (f", tool {tool!r}" if tool is not None else "")
        super().__init__(f"{where}: {problem}")
        self.server = server
        self.tool = tool
        self.problem = problem
        self.transient = transient


# --- Configuration ---------------------------------------------------------------------------------


ServerName = Annotated[str, StringConstraints(pattern=SERVER_NAME_PATTERN)]


class _ServerLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Bounds connecting (start and handshake), each tool listing, and each tool call.
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0, le=3600)
    # The largest result, serialized as compact JSON, a call may return.
    max_result_bytes: int = Field(default=DEFAULT_MAX_RESULT_BYTES, gt=0, le=64 * 1024 * 1024)


class StdioServerConfig(_ServerLimits):
    """A server Warden starts as a child process and talks to over its stdin and stdout.

    `command` is looked up on the PATH the server process gets (Warden's own unless `env` sets
    PATH); nothing is special about "python": give an absolute interpreter path when it matters
    which one runs. The process gets only the SDK's safe subset of Warden's environment (HOME,
    LOGNAME, PATH, SHELL, TERM, USER) plus `env`, so Warden's own secrets never reach it.
    """

    transport: Literal["stdio"]
    command: str = Field(min_length=1)
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict, repr=False)


class StreamableHttpServerConfig(_ServerLimits):
    """A server Warden reaches over MCP's streamable HTTP transport at `url`, sending `headers` with every request."""

    transport: Literal["streamable_http"]
    url: str
    # Often carries a credential (Authorization): kept out of reprs and logs.
    headers: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError on a malformed port)
        except ValueError as error:
            raise ValueError(f"not a valid URL: {error}") from error
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return url


ServerConfig = Annotated[StdioServerConfig | StreamableHttpServerConfig, Field(discriminator="transport")]


class TenantToolServers(BaseModel):
    """One tenant's MCP servers, by name (the prefix of their tools' Warden names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: dict[ServerName, ServerConfig] = Field(default_factory=dict)


class ToolServersConfig(BaseModel):
    """Every tenant's MCP tool servers: the whole configuration file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenants: dict[TenantId, TenantToolServers] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ToolServersConfig":
        """Read and validate a configuration file; any problem raises `ToolServerConfigError` naming file and field."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ToolServerConfigError(f"{path}: cannot read MCP tool server configuration: {error}") from error
        try:
            data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicate_keys)
        except ValueError as error:  # json.JSONDecodeError is a ValueError too
            raise ToolServerConfigError(f"{path}: not valid JSON: {error}") from error
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = describe_validation_error(error)
            raise ToolServerConfigError(f"{path}: invalid MCP tool server configuration: {problems}") from error


def _reject_constant(constant: str) -> float:
    # Python's json accepts NaN and Infinity, which no other JSON reader does.
    raise ValueError(f"{constant} is not valid JSON")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys: a server defined twice would vanish silently.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


# --- Tool definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolDefinition:
    """One MCP tool as a Warden tool."""

    name: str  # "<server>.<tool>"
    server: str
    tool: str  # the MCP tool name
    description: str
    input_schema: dict[str, Any]
    digest: str  # tool_digest(tool, description, input_schema): what gets pinned


def tool_digest(tool: str, description: str, input_schema: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of the canonical JSON of what a model is shown of a tool: its name, description and input schema.

    A server that changes any of them (a reworded description is enough to steer a model) changes the digest.
    """
    canonical = json.dumps(
        {"name": tool, "description": description, "input_schema": input_schema},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _definition(server: str, tool: Tool) -> ToolDefinition:
    description = tool.description or ""
    return ToolDefinition(
        name=f"{server}.{tool.name}",
        server=server,
        tool=tool.name,
        description=description,
        input_schema=tool.input_schema,
        digest=tool_digest(tool.name, description, tool.input_schema),
    )


# --- One session -----------------------------------------------------------------------------------


@functools.cache
def _client_info() -> Implementation:
    try:
        warden_version = version("warden-control-plane")
    except PackageNotFoundError:
        warden_version = "0"
    return Implementation(name="warden-agent-runner", version=warden_version)


class _ServerSession:
    """One MCP session to one server, held open by a task of its own.

    The SDK's client is a stack of anyio task groups that must be entered and left by one task. Its
    own task lets any caller's task open it, use it and close it (or abandon it when closing hangs),
    and a failure of the transport ends that task rather than a caller's.
    """

    def __init__(self, name: str, config: StdioServerConfig | StreamableHttpServerConfig) -> None:
        self.name = name
        self.config = config
        # The server's tools by MCP name, from the last listing on this session.
        self.tools: dict[str, Tool] | None = None
        self._opened: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stderr: TextIO | None = None
        self.discarded = False

    @property
    def alive(self) -> bool:
        """Open and still held: the transport has not failed on its own."""
        return self._task is not None and not self._task.done() and self._opened.done()

    @property
    def client(self) -> Client:
        return self._opened.result()

    async def open(self) -> None:
        """Start the server (stdio) or reach it (HTTP) and complete the MCP handshake, within `timeout_seconds`."""
        self._task = asyncio.create_task(self._hold_open(), name=f"mcp-session-{self.name}")
        try:
            # Shielded: a cancelled caller must not cancel the outcome the session's task reports.
            await asyncio.shield(self._opened)
        except asyncio.CancelledError:
            self._opened.add_done_callback(_retrieve_outcome)
            raise

    async def _hold_open(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                # Bounds the start and the handshake only: the session itself stays open until closed.
                async with asyncio.timeout(self.config.timeout_seconds):
                    client = await stack.enter_async_context(await self._client(stack))
                self._opened.set_result(client)
                await self._stop.wait()
        # A server is outside Warden: whatever its transport raises is reported, never let loose here.
        except Exception as error:
            if not self._opened.done():
                self._opened.set_exception(ToolServerError(self.name, self._open_failure(error), transient=True))
            else:
                log.info("MCP session ended by a transport failure", server=self.name, error=_describe(error))
        finally:
            if not self._opened.done():  # cancelled before the handshake completed
                self._opened.set_exception(ToolServerError(self.name, "connecting was cancelled"))
            if self._stderr is not None:
                self._stderr.close()

    async def _client(self, stack: AsyncExitStack) -> Client:
        config = self.config
        if isinstance(config, StdioServerConfig):
            # The server's stderr goes to a file so a failure can quote its last lines.
            # (On POSIX, TemporaryFile is the text file object itself, closed when the session ends.)
            self._stderr = cast(TextIO, tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))  # noqa: SIM115
            parameters = StdioServerParameters(command=config.command, args=list(config.args), env=dict(config.env))
            transport = stdio_client(parameters, errlog=self._stderr)
        else:
            http = await stack.enter_async_context(
                httpx2.AsyncClient(
                    headers=config.headers,
                    timeout=httpx2.Timeout(config.timeout_seconds, read=_HTTP_STREAM_READ_TIMEOUT_SECONDS),
                )
            )
            # One event carries the whole result (often twice: as text and as structured content),
            # so the SDK's per-event cap must leave room for the largest result allowed.
            event_limit = max(DEFAULT_MAX_SSE_EVENT_SIZE, 4 * config.max_result_bytes)
            transport = streamable_http_client(config.url, http_client=http, max_sse_event_size=event_limit)
        # mode "auto": the 2026 `server/discover`, falling back to the `initialize` handshake.
        # cache=None: a listing is always the server's current one, never a remembered copy.
        return Client(transport, mode="auto", cache=None, client_info=_client_info())

    def _open_failure(self, error: BaseException) -> str:
        if isinstance(error, TimeoutError):
            problem = f"did not start and complete the MCP handshake within {self.config.timeout_seconds:g}s"
        elif isinstance(error, OSError) and isinstance(self.config, StdioServerConfig):
            problem = f"cannot start {self.config.command!r}: {error}"
        else:
            problem = f"cannot connect: {_describe(error)}"
        return problem + self.stderr_tail()

    def stderr_tail(self) -> str:
        """The last lines the stdio server wrote to stderr, as a suffix for an error message ('' if none)."""
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            descriptor = self._stderr.fileno()
            size = os.fstat(descriptor).st_size
            tail = os.pread(descriptor, _STDERR_TAIL_BYTES, max(0, size - _STDERR_TAIL_BYTES))
        except OSError:
            return ""
        text = tail.decode("utf-8", errors="replace").strip()
        return f"; its stderr ends: {text}" if text else ""

    async def close(self) -> None:
        """End the session and the server process; returns within about 10 s even if the server hangs."""
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        _, pending = await asyncio.wait({task}, timeout=_CLOSE_GRACE_SECONDS)
        if pending:
            task.cancel()
            _, pending = await asyncio.wait({task}, timeout=_CANCEL_GRACE_SECONDS)
        if pending:
            log.warning("MCP session did not close in time; abandoning it", server=self.name)


def _retrieve_outcome(future: asyncio.Future[Client]) -> None:
    # Marks a failure nobody awaits as seen, so asyncio does not log it as never retrieved.
    if not future.cancelled():
        future.exception()


def _describe(error: BaseException) -> str:
    """One line for an error, the task-group wrappers the SDK raises through left out."""
    if isinstance(error, BaseExceptionGroup):
        leaves = list(dict.fromkeys(_describe(inner) for inner in error.exceptions))
        return "; ".join(leaves)
    if isinstance(error, MCPError) and error.code == CONNECTION_CLOSED:
        return "the connection closed (the server exited or dropped it)"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _session_is_sound_after(error: MCPError) -> bool:
    """Whether the server judged this request itself, so the session that carried it is still sound.

    The SDK turns transport trouble into MCPErrors too (connection closed, an HTTP 5xx as -32603,
    "session terminated" as -32600): for anything but a verdict on the request, start afresh.
    """
    return error.code in (INVALID_PARAMS, METHOD_NOT_FOUND)


# --- The toolbox -----------------------------------------------------------------------------------


class McpToolbox:
    """Async context manager holding open sessions to one tenant's MCP servers.

    Sessions open lazily, on the first listing or call that needs the server: a run that uses no
    MCP tool starts no server, and a server that is down fails only what needs it. A session that
    timed out or lost its server is dropped (closed in the background) and opened again when next
    needed, so one bad call does not poison the runner. Leaving the block closes every session,
    within about 10 s even if a server hangs.
    """

    def __init__(self, tenant: str, servers: Mapping[str, StdioServerConfig | StreamableHttpServerConfig]) -> None:
        self.tenant = tenant
        self._servers = dict(servers)
        self._sessions: dict[str, _ServerSession] = {}
        self._opening: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in self._servers}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def for_tenant(cls, config: ToolServersConfig, tenant: str) -> "McpToolbox":
        """The toolbox of one tenant; a tenant the configuration does not name has no MCP tools."""
        tenant_servers = config.tenants.get(tenant)
        return cls(tenant, tenant_servers.servers if tenant_servers is not None else {})

    @property
    def server_names(self) -> list[str]:
        return list(self._servers)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every session (they close concurrently, so this is bounded like one `_ServerSession.close`)."""
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions), *self._closing)

    async def definitions(self) -> list[ToolDefinition]:
        """Every tool of every server, listed now; a server that cannot be reached or listed raises
        `ToolServerError` (see `listing` for what the others answered)."""
        listed, failures = await self.listing()
        if failures:
            first, *rest = failures.values()
            if not rest:
                raise first
            others = ", ".join(repr(failure.server) for failure in rest)
            raise ToolServerError(first.server, f"{first.problem} (failing too: {others})", tool=first.tool) from first
        return listed

    async def listing(self) -> tuple[list[ToolDefinition], dict[str, ToolServerError]]:
        """The tools of every server that answered, listed now, and why each other server did not:
        one server that is down does not hide the others' tools."""
        listings = await asyncio.gather(*(self._list_tools(name) for name in self._servers), return_exceptions=True)
        listed: list[ToolDefinition] = []
        failures: dict[str, ToolServerError] = {}
        for name, outcome in zip(self._servers, listings, strict=True):
            if isinstance(outcome, ToolServerError):
                failures[name] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # a bug, or a cancellation: not a server's fault
            else:
                listed += [_definition(name, tool) for tool in outcome]
        return listed, failures

    async def call(self, name: str, arguments: Mapping[str, Any], *, idempotency_key: str | None = None) -> JsonValue:
        """Call the tool `<server>.<tool>` and return its result as JSON.

        `idempotency_key` travels in the request's `_meta` (IDEMPOTENCY_META_KEY): a server that
        honours it does a call's side effect once however often the call is tried.

        The result is the tool's structured content if it has any, else its content items as dicts
        (`{"type": "text", "text": ...}`). An unknown tool raises `ToolError`; a tool that reports an
        error, takes longer than the server's `timeout_seconds`, answers more than its
        `max_result_bytes`, or whose server is gone or crashes mid-call raises `ToolServerError`.
        """
        server, _, tool = name.partition(".")
        if server not in self._servers or not tool:
            known = ", ".join(repr(server) for server in self._servers) or "none"
            raise ToolError(
                f"unknown tool {name!r}: MCP tools are named <server>.<tool>, and tenant {self.tenant!r} "
                f"has no MCP tool server {server!r} (its servers: {known})"
            )
        session = await self._session(server)
        if session.tools is None or tool not in session.tools:
            await self._list_on(session)  # a tool the server added since this session last listed is found too
        if tool not in (session.tools or {}):
            raise ToolError(f"unknown tool {name!r}: MCP tool server {server!r} has no tool {tool!r}")
        # An open map (`extra_items=Any`): a key of Warden's own sits beside the protocol's.
        meta = cast(RequestParamsMeta, {IDEMPOTENCY_META_KEY: idempotency_key}) if idempotency_key else None
        result = await self._bounded(
            session, lambda client: client.call_tool(tool, dict(arguments), meta=meta), doing="call", tool=tool
        )
        return self._json_result(session, tool, result)

    async def _list_tools(self, server: str) -> list[Tool]:
        return await self._list_on(await self._session(server))

    async def _list_on(self, session: _ServerSession) -> list[Tool]:
        async def every_page(client: Client) -> list[Tool]:
            tools: list[Tool] = []
            cursor: str | None = None
            for _ in range(_MAX_LISTING_PAGES):
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if cursor is None:
                    return tools
            raise ToolServerError(session.name, f"lists its tools in more than {_MAX_LISTING_PAGES} pages")

        tools = await self._bounded(session, every_page, doing="tool listing")
        session.tools = {tool.name: tool for tool in tools}
        return tools

    async def _session(self, server: str) -> _ServerSession:
        if self._closed:
            raise ToolServerError(server, "the toolbox is closed")
        session = self._sessions.get(server)
        if session is not None and session.alive:
            return session
        # One opening at a time per server: concurrent first calls share one server process.
        async with self._opening[server]:
            session = self._sessions.get(server)
            if session is not None and session.alive:
                return session
            if session is not None:  # its transport failed while it was idle
                self._discard(session)
            session = _ServerSession(server, self._servers[server])
            try:
                await session.open()
            except BaseException:
                self._discard(session)  # failed, or its caller was cancelled: nobody else will close it
                raise
            self._sessions[server] = session
            return session

    async def _bounded(
        self,
        session: _ServerSession,
        request: Callable[[Client], Awaitable[_T]],
        *,
        doing: str,
        tool: str | None = None,
    ) -> _T:
        """Run one request on the session within the server's timeout, every failure as a `ToolServerError`."""
        timeout = session.config.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await request(session.client)
        except ToolServerError:
            raise
        except TimeoutError as error:
            # The server may still be working on it, or be stuck: a fresh session is the safe state.
            self._discard(session)
            raise ToolServerError(
                session.name,
                f"the {doing} took longer than {timeout:g}s; the session was dropped and reopens on the next call",
                tool=tool,
                transient=True,
            ) from error
        except MCPError as error:
            sound = _session_is_sound_after(error)
            if sound:
                problem = f"the server refused the {doing} with error {error.code}: {_limited(error.message)}"
            elif error.code == CONNECTION_CLOSED:
                problem = f"the {doing} failed: {_describe(error)}{session.stderr_tail()}; it restarts on the next call"
                self._discard(session)
            else:
                self._discard(session)
                problem = (
                    f"the {doing} failed with error {error.code}: {_limited(error.message)}; "
                    "the session was dropped and reopens on the next call"
                )
            raise ToolServerError(session.name, problem, tool=tool, transient=not sound) from error
        # The server and its transport are outside Warden: anything they raise is the server's failure.
        except Exception as error:
            problem = f"the {doing} failed: {_describe(error)}{session.stderr_tail()}"
            self._discard(session)
            raise ToolServerError(session.name, problem, tool=tool, transient=True) from error

    def _json_result(self, session: _ServerSession, tool: str, result: CallToolResult) -> JsonValue:
        if result.is_error:
            raise ToolServerError(session.name, f"the tool reported an error: {_error_text(result)}", tool=tool)
        value: Any
        if result.structured_content is not None:
            value = result.structured_content
        else:
            value = [item.model_dump(mode="json", by_alias=True, exclude_none=True) for item in result.content]
        try:
            size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"))
        except (TypeError, ValueError) as error:
            raise ToolServerError(session.name, f"the result is not JSON: {error}", tool=tool) from error
        limit = session.config.max_result_bytes
        if size > limit:
            raise ToolServerError(
                session.name, f"the result is {size} bytes of JSON, over the limit of {limit} bytes", tool=tool
            )
        return cast(JsonValue, value)

    def _discard(self, session: _ServerSession) -> None:
        """Forget the session and close it in the background: the caller's error need not wait for it to stop."""
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
        if session.discarded:  # two calls on it failed at once
            return
        session.discarded = True
        closing = asyncio.create_task(session.close(), name=f"mcp-close-{session.name}")
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


def _error_text(result: CallToolResult) -> str:
    texts = [item.text for item in result.content if isinstance(item, TextContent)]
    if texts:
        return _limited("\n".join(texts))
    return _limited(json.dumps([item.model_dump(mode="json", exclude_none=True) for item in result.content]))


def _limited(text: str) -> str:
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[:_ERROR_TEXT_LIMIT] + "… (cut)"
