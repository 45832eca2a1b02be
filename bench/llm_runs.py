"""W3llm: W3 with the `llm` agent against Warden's offline model server, to measure what Warden adds
per model turn and per tool call beside the same conversation made directly, with no Warden.

Each run's prompt makes the model ask for two tool calls in its first turn (`text.echo` and
`math.add`) and answer in its second: 2 model turns and 2 tool calls per run, every one gated and
recorded. The direct baseline is the bench itself holding the same conversation with the same
server through the official `openai` SDK, running the same built-in tools in-process.

Governed times are read from the run's own messages: JetStream stamps each message it stores, so
the interval from `model_call.requested` to `step.completed` (a model turn) and from
`tool_call.requested` to `tool_call.completed` (a tool call) are on one clock, the server's (the
requests are commands and the rest events, in two streams of the same single-node server).
"""

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import openai
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from bench.common import (
    REPO_ROOT,
    CpuMeter,
    Installation,
    ServiceProcesses,
    admin_connect,
    latency_summary,
    percentile,
)
from warden.agent_runner.llm_agent import LlmAgentDefinition, function_name, tool_name
from warden.agent_runner.tools import BUILTIN_TOOL_SCHEMAS, run_tool
from warden.client import WardenClient
from warden.consumers import ordered_subscription
from warden.database import DatabaseRole
from warden.messages import (
    DecisionMade,
    ModelCallRequested,
    StepCompleted,
    ToolCallCompleted,
    ToolCallRequested,
    parse_envelope,
)
from warden.offline_model import OfflineModelServer
from warden.streams import StreamNames
from warden.wire import TYPE_HEADER

SERVICES = ("audit_projector", "policy_gate", "scheduler", "agent_runner")
AGENT = "assistant"
# Both tenants of the shipped policy data may run the assistant on the offline model.
TENANTS = {"acme": "alice", "globex": "gina"}
SEQUENTIAL_TENANT = "acme"
# The model obeys the latest user message: two CALL lines make one turn with two tool calls; the tool
# results carry no directive, so its next turn answers.
PROMPT = 'CALL text__echo {"text": "benchmark"}\nCALL math__add {"a": 2, "b": 3}'
MODEL_TURNS, TOOL_CALLS = 2, 2
RUN_TIMEOUT_SECONDS = 120.0
READ_BACK_TIMEOUT_SECONDS = 30.0
PROJECTION_POLL_SECONDS = 0.02
WARM_UP_SEQUENTIAL = 3


def assistant_definition() -> LlmAgentDefinition:
    """The shipped `assistant`, offering only its built-in tools.

    The shipped definition also offers the MCP `time` tools, which need a tool server this benchmark
    does not run: the runner would leave them out of every request and warn about it on each model
    call. The conversation measured uses only built-in tools either way.
    """
    shipped = json.loads((REPO_ROOT / "agents" / f"{AGENT}.json").read_text(encoding="utf-8"))
    shipped["tools"] = [tool for tool in shipped["tools"] if tool in BUILTIN_TOOL_SCHEMAS]
    return LlmAgentDefinition.model_validate(shipped)


def offered_tools(definition: LlmAgentDefinition) -> list[ChatCompletionToolParam]:
    """The tools as the runner offers them to the model (same names, descriptions and schemas)."""
    offered: list[ChatCompletionToolParam] = []
    for tool in definition.tools:
        description, parameters = BUILTIN_TOOL_SCHEMAS[tool]
        offered.append(
            {
                "type": "function",
                "function": {"name": function_name(tool), "description": description, "parameters": dict(parameters)},
            }
        )
    return offered


@dataclass
class Timings:
    """Seconds per operation: model calls (or turns), tool calls, whole conversations (or runs)."""

    model: list[float] = field(default_factory=list)
    tool: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)


async def direct_conversation(
    client: openai.AsyncOpenAI, definition: LlmAgentDefinition, tools: list[ChatCompletionToolParam], into: Timings
) -> None:
    """The run's conversation with no Warden: the same requests the runner makes, the tools run here."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": definition.system_prompt},
        {"role": "user", "content": PROMPT},
    ]
    options: dict[str, Any] = {}
    # Sent only when set, as the runner does (warden.agent_runner.model_client).
    if definition.max_output_tokens is not None:
        options["max_tokens"] = definition.max_output_tokens
    if definition.temperature is not None:
        options["temperature"] = definition.temperature
    model_calls = tool_calls = 0
    started = time.perf_counter()
    for _ in range(definition.max_steps):
        before = time.perf_counter()
        completion = await client.chat.completions.create(
            model=definition.model, messages=messages, tools=tools, **options
        )
        into.model.append(time.perf_counter() - before)
        model_calls += 1
        message = completion.choices[0].message
        calls = [call for call in message.tool_calls or [] if isinstance(call, ChatCompletionMessageFunctionToolCall)]
        if not calls:
            break
        messages.append(
            {
                "role": "assistant",
                "content": message.content,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                    for call in calls
                ],
            }
        )
        for call in calls:
            arguments = json.loads(call.function.arguments)
            before = time.perf_counter()
            result = await run_tool(tool_name(call.function.name), arguments)
            into.tool.append(time.perf_counter() - before)
            tool_calls += 1
            # The tool message as the runner words an ok result (warden.agent_runner.llm_agent).
            content = result if isinstance(result, str) else json.dumps(result, sort_keys=True)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    into.whole.append(time.perf_counter() - started)
    if (model_calls, tool_calls) != (MODEL_TURNS, TOOL_CALLS):
        # A changed model or prompt would compare other work than the governed runs do.
        raise RuntimeError(f"direct conversation made {model_calls} model and {tool_calls} tool calls")


class Projection:
    """Waits until the projector has written every message stored so far in the audited streams."""

    def __init__(self, nc: NatsClient, db: asyncpg.Connection, names: StreamNames) -> None:
        self.js = nc.jetstream()
        self.db = db
        self.names = names

    async def caught_up(self) -> None:
        stored = sum([(await self.js.stream_info(name)).state.last_seq for name in self.names.audited])
        # Polling: the position lives in another process's Postgres rows, no event to wait on.
        while (await self.db.fetchval("SELECT coalesce(sum(last_seq), 0) FROM projector_positions")) < stored:  # noqa: ASYNC110
            await asyncio.sleep(PROJECTION_POLL_SECONDS)


async def stored_messages(
    js: JetStreamContext, stream: str, subject: str, run_ids: set[str], into: dict[str, list[tuple[float, Any]]]
) -> None:
    """The runs' messages on `subject` of `stream` as (stored at, payload), read back in order."""
    caught_up = asyncio.Event()

    async def on_message(message: Msg) -> None:
        try:
            envelope = parse_envelope(message.data, type_hint=(message.headers or {}).get(TYPE_HEADER))
            if envelope.entity_id in run_ids:
                into.setdefault(envelope.entity_id, []).append((message.metadata.timestamp.timestamp(), envelope.data))
        finally:
            # Set even if a message does not parse (that run then fails its count, saying so).
            if message.metadata.num_pending == 0:
                caught_up.set()

    subscription = await ordered_subscription(js, [subject], stream, on_message)
    try:
        await asyncio.wait_for(caught_up.wait(), READ_BACK_TIMEOUT_SECONDS)
    finally:
        await subscription.unsubscribe()


@dataclass
class Governed:
    """Governed runs' operations, from their stored messages: each whole, and its gate part (request
    stored to decision stored; the rest is the runner acting on it and recording the result)."""

    model: list[float] = field(default_factory=list)
    model_gate: list[float] = field(default_factory=list)
    tool: list[float] = field(default_factory=list)
    tool_gate: list[float] = field(default_factory=list)

    def add(self, run_id: str, messages: Sequence[tuple[float, Any]]) -> None:
        """One run's operations; its messages in any order (they come from two streams)."""
        requested: dict[str, float] = {}  # call id -> stored at
        decided: dict[str, float] = {}
        model_call_at_step: dict[int, str] = {}
        model_done: dict[int, float] = {}  # step -> stored at
        tool_done: dict[str, float] = {}
        for stored_at, payload in messages:
            match payload:
                case ModelCallRequested():
                    requested[payload.call_id] = stored_at
                    model_call_at_step[payload.step] = payload.call_id
                case ToolCallRequested():
                    requested[payload.tool_call_id] = stored_at
                case DecisionMade() if payload.tool_call_id is not None:
                    decided[payload.tool_call_id] = stored_at
                case StepCompleted() if payload.kind == "model_turn":
                    model_done[payload.step] = stored_at
                case ToolCallCompleted():
                    if payload.outcome != "ok":
                        # A refused or failed call is not the work the direct baseline does.
                        raise RuntimeError(f"run {run_id}: {payload.tool} {payload.outcome}: {payload.error}")
                    tool_done[payload.tool_call_id] = stored_at
        turns = {model_call_at_step[step]: at for step, at in model_done.items() if step in model_call_at_step}
        if (len(turns), len(tool_done)) != (MODEL_TURNS, TOOL_CALLS) or not set(turns) | set(
            tool_done
        ) <= decided.keys() & requested.keys():
            raise RuntimeError(
                f"run {run_id}: {len(turns)} model turns and {len(tool_done)} tool calls found with their requests "
                f"and decisions, not {MODEL_TURNS} and {TOOL_CALLS}"
            )
        for done, whole, gate in ((turns, self.model, self.model_gate), (tool_done, self.tool, self.tool_gate)):
            for call_id, at in done.items():
                whole.append(at - requested[call_id])
                gate.append(decided[call_id] - requested[call_id])


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def overhead(governed: Sequence[float], direct: Sequence[float]) -> dict[str, float]:
    """What Warden adds to one operation, quantile by quantile (the operations are not paired, so the
    difference of medians, and of p99s, is what can be said), and the ratio of the medians; the
    quantiles are latency_summary's, so the numbers match the table's."""
    return {
        "p50_ms": _ms(percentile(governed, 0.5) - percentile(direct, 0.5)),
        "p99_ms": _ms(percentile(governed, 0.99) - percentile(direct, 0.99)),
        "p50_ratio": round(percentile(governed, 0.5) / percentile(direct, 0.5), 2),
    }


class Workload:
    """The offline model server, the four services configured to reach it, and the bench's clients."""

    def __init__(self, definition: LlmAgentDefinition, server: OfflineModelServer, label: str) -> None:
        self.definition = definition
        self.tools = offered_tools(definition)
        self.server = server
        self.label = label
        self.finished: dict[str, asyncio.Future[str]] = {}

    async def start(self, cleanup: AsyncExitStack, nats_url: str, admin_url: str, concurrency: int) -> None:
        agents_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="warden-bench-agents-")))
        (agents_dir / f"{AGENT}.json").write_text(self.definition.model_dump_json(), encoding="utf-8")
        install = await Installation.create(
            nats_url, admin_url, tenant_concurrency=concurrency, runner_concurrency=concurrency
        )
        endpoint = self.definition.endpoint
        extra_env = {"WARDEN_AGENTS_DIR": str(agents_dir)}
        if endpoint.base_url_env:
            extra_env[endpoint.base_url_env] = self.server.base_url
        if endpoint.model_env:
            # Pinned, so that a model named in the bench's own environment cannot change what is measured.
            extra_env[endpoint.model_env] = self.definition.model
        services = ServiceProcesses(install.settings, extra_env=extra_env)
        cleanup.push_async_callback(services.stop)
        await services.start(*SERVICES)
        # The runner's client settings (warden.agent_runner.model_client); the server needs no key.
        self.direct_client = openai.AsyncOpenAI(
            base_url=self.server.base_url,
            api_key="no-key",
            timeout=endpoint.timeout_seconds,
            max_retries=endpoint.max_retries,
        )
        cleanup.push_async_callback(self.direct_client.close)
        self.nc = await admin_connect(nats_url)
        cleanup.push_async_callback(self.nc.close)
        db = await asyncpg.connect(install.settings.database_url_for(DatabaseRole.READER))
        cleanup.push_async_callback(db.close)
        self.prefix = install.settings.subject_prefix
        self.names = StreamNames.for_prefix(self.prefix)
        self.projection = Projection(self.nc, db, self.names)
        self.client = WardenClient(self.nc, self.prefix)
        await self.nc.subscribe(f"{self.prefix}.evt.*.run.*.run.succeeded", cb=self._on_finish)
        await self.nc.subscribe(f"{self.prefix}.evt.*.run.*.run.failed", cb=self._on_finish)

    async def _on_finish(self, message: Msg) -> None:
        waiter = self.finished.pop(message.subject.split(".")[4], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.subject.rsplit(".", 1)[-1])

    async def run(self, tenant: str, run_id: str | None = None) -> float:
        """One governed run, submitted and waited for (as its client sees it); its latency."""
        run_id = run_id or uuid.uuid4().hex
        self.finished[run_id] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        await self.client.submit_run(
            tenant=tenant, agent=AGENT, actor=TENANTS[tenant], input={"prompt": PROMPT}, run_id=run_id
        )
        outcome = await asyncio.wait_for(self.finished[run_id], RUN_TIMEOUT_SECONDS)
        if outcome != "succeeded":
            raise RuntimeError(f"run {run_id} {outcome}")
        return time.perf_counter() - started

    async def direct(self, into: Timings) -> None:
        await direct_conversation(self.direct_client, self.definition, self.tools, into)

    async def warm_up(self, concurrency: int) -> None:
        """Every service has loaded its code, built its policy engine and opened its connection to
        the model; so has the direct client."""
        tenants = list(TENANTS)
        await asyncio.gather(*(self.run(tenants[index % len(tenants)]) for index in range(min(concurrency, 20))))
        for _ in range(WARM_UP_SEQUENTIAL):
            await self.run(SEQUENTIAL_TENANT)
            await self.direct(Timings())
        await self.projection.caught_up()

    async def sequential(self, runs: int, direct_per_run: int) -> dict[str, Any]:
        """One operation at a time: governed runs (of one tenant) alternating with direct conversations,
        so that both see the same machine, whatever else it does meanwhile."""
        direct, governed_runs = Timings(), Timings()
        run_ids: set[str] = set()
        for index in range(runs):
            for _ in range(direct_per_run):
                await self.direct(direct)
            run_id = uuid.uuid4().hex
            run_ids.add(run_id)
            governed_runs.whole.append(await self.run(SEQUENTIAL_TENANT, run_id))
            # The projector's trailing work would otherwise land on the next direct conversations.
            await self.projection.caught_up()
            if (index + 1) % max(1, runs // 4) == 0:
                run_p50, direct_p50 = percentile(governed_runs.whole, 0.5), percentile(direct.whole, 0.5)
                print(
                    f"{self.label}: sequential {index + 1}/{runs} runs; run p50 {_ms(run_p50)} ms, "
                    f"direct conversation p50 {_ms(direct_p50)} ms",
                    flush=True,
                )
        stored: dict[str, list[tuple[float, Any]]] = {}
        js = self.nc.jetstream()
        await stored_messages(js, self.names.commands, f"{self.prefix}.cmd.{SEQUENTIAL_TENANT}.>", run_ids, stored)
        await stored_messages(js, self.names.events, f"{self.prefix}.evt.{SEQUENTIAL_TENANT}.run.>", run_ids, stored)
        governed = Governed()
        for run_id in run_ids:
            governed.add(run_id, stored.get(run_id, []))
        return {
            "runs": runs,
            "direct_conversations": len(direct.whole),
            "direct": {
                "model_call": latency_summary(direct.model),
                "tool_call": latency_summary(direct.tool),
                "conversation": latency_summary(direct.whole),
            },
            "governed": {
                "model_turn": latency_summary(governed.model),
                "model_turn_gate": latency_summary(governed.model_gate),
                "tool_call": latency_summary(governed.tool),
                "tool_call_gate": latency_summary(governed.tool_gate),
                "run": latency_summary(governed_runs.whole),
            },
            "overhead": {
                "model_turn": overhead(governed.model, direct.model),
                "tool_call": overhead(governed.tool, direct.tool),
                "run": overhead(governed_runs.whole, direct.whole),
            },
        }

    async def concurrent(self, runs: int, concurrency: int) -> dict[str, Any]:
        """As W3: a closed loop of `concurrency` runs in flight across both tenants until `runs` have
        succeeded, with the CPU each process spent per run until every run is projected."""
        await self.projection.caught_up()
        latencies: list[float] = []
        counter = iter(range(runs))
        tenants = list(TENANTS)
        model_requests = self.server.requests

        async def worker() -> None:
            for index in counter:
                latencies.append(await self.run(tenants[index % len(tenants)]))

        cpu = CpuMeter()
        cpu.start()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        completed = time.perf_counter() - started
        await self.projection.caught_up()
        projected = time.perf_counter() - started
        cpu_seconds = cpu.stop()  # while the services still run
        # The model server runs in the bench's process, so it is counted with the load generator.
        if "load generator" in cpu_seconds:
            cpu_seconds["bench (load generator + model server)"] = cpu_seconds.pop("load generator")
        return {
            "runs": runs,
            "concurrency": concurrency,
            "runs_per_second": round(runs / completed, 1),
            "runs_per_second_projected": round(runs / projected, 1),
            # 2 when no request was retried.
            "model_requests_per_run": round((self.server.requests - model_requests) / runs, 2),
            "latency": latency_summary(latencies),
            "cpu_ms_per_run": {role: round(seconds / runs * 1000, 2) for role, seconds in cpu_seconds.items()},
        }


async def run_w3_llm(
    nats_url: str,
    admin_url: str,
    *,
    sequential_runs: int,
    direct_per_run: int,
    runs: int,
    concurrency: int,
    label: str = "W3llm",
) -> dict[str, Any]:
    """Warm up, then the sequential phase (per operation, governed beside direct), then the concurrent one."""
    definition = assistant_definition()
    async with AsyncExitStack() as cleanup:
        # In this process: its CPU counts as the load generator's in the concurrent phase.
        server = await cleanup.enter_async_context(OfflineModelServer(models=(definition.model,)))
        workload = Workload(definition, server, label)
        await workload.start(cleanup, nats_url, admin_url, concurrency)
        await workload.warm_up(concurrency)
        sequential = await workload.sequential(sequential_runs, direct_per_run)
        print(f"{label} sequential", json.dumps(sequential["overhead"]), flush=True)
        concurrent = await workload.concurrent(runs, concurrency)
        print(f"{label} concurrent", json.dumps(concurrent), flush=True)
    return {
        "agent": AGENT,
        "model": definition.model,
        "prompt": PROMPT,
        "sequential": sequential,
        "concurrent": concurrent,
    }
