"""`warden policy replay` at scale: recorded decisions re-decided on a candidate bundle, per second.

    uv run --group bench python -m bench.policy_replay [--decisions 100000]

A history of distinct decisions (every run its own id; tool calls with allowed and refused URLs,
model calls, run starts, across tenants and principals) is decided on the shipped policy pack by
the gate's own rules (`decide.judge_input`) and stored in an embedded NATS as the gate stores its
`decision.made` events, each with its input. The candidate is the shipped pack with one domain
taken out of `web.fetch`'s allowed list, so a known share of the allows flip to denies.

Measured: reading the decision events back from JetStream (warden.decision_history), re-deciding
them (already read: parsed, judged and compared) in this process and with one worker per CPU, and
the whole replay as `warden policy replay` runs it (each event handed to the workers as it is read,
worker start-up included). The passes with the history already read also give the rate sustained once
the workers are up. Each pass checks that exactly the expected decisions
flipped. Writes bench/results/policy_replay.json.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import admin_connect, embedded
from bench.run import RESULTS
from warden.decision_history import RecordedDecision, read_decision_events
from warden.messages import DecisionMade, ModelCallRequested, RunSubmitted, RunUsage, ToolCallRequested, make_envelope
from warden.policy_gate.decide import judge_input, policy_input
from warden.policy_gate.engine import SHIPPED_POLICY_DIR, PolicyEngine
from warden.policy_gate.policy_replay import PolicyReplay, replay_events
from warden.streams import stream_configs
from warden.subjects import Subjects

# Taken out of web.fetch's allowed domains in the candidate: fetches there flip from allow to deny.
REMOVED_DOMAIN = "docs.python.org"
URLS = (
    "https://example.com/research",
    "https://docs.python.org/3/library/asyncio.html",
    "https://www.example.com:8443/report?q=1",
    "https://evil.example.net/",
    "https://example.com@evil.com/",
)
PRINCIPALS = (("acme", "alice"), ("acme", "bob"), ("acme", "carol"), ("globex", "gina"), ("globex", "hank"))
AGENTS = ("researcher", "demo", "assistant", "reporter")
MODELS = ("warden-test-model", "gpt-4o-mini", "llama3.2")


def _request(index: int, rng: random.Random) -> Any:
    tenant, principal = rng.choice(PRINCIPALS)
    agent = rng.choice(AGENTS)
    run_id = f"R{index:08d}bench"
    usage = RunUsage(steps=rng.randrange(0, 12), tool_calls=rng.randrange(0, 22), input_tokens=rng.randrange(0, 9000))
    kind = rng.random()
    if kind < 0.15:
        payload: Any = RunSubmitted(agent=agent, input={"question": f"q{index}"})
    elif kind < 0.40:
        payload = ModelCallRequested(
            call_id=f"{run_id}-m{usage.steps}",
            step=usage.steps,
            agent=agent,
            model=rng.choice(MODELS),
            max_output_tokens=rng.choice((256, 1024, 4096)),
            usage=usage,
        )
    else:
        tool = rng.choice(("web.fetch", "web.fetch", "web.fetch", "text.echo", "math.add"))
        arguments: dict[str, Any] = {"url": rng.choice(URLS)} if tool == "web.fetch" else {"a": index, "b": 2}
        payload = ToolCallRequested(
            tool_call_id=f"{run_id}-tc{usage.tool_calls}",
            step=usage.steps,
            agent=agent,
            tool=tool,
            arguments=arguments,
            usage=usage,
        )
    return make_envelope(payload, tenant=tenant, entity_id=run_id, actor=principal, source="bench")


def history(decisions: int, engine: PolicyEngine) -> list[tuple[str, bytes, RecordedDecision]]:
    """The recorded decisions: (subject, stored event, what it records)."""
    rng = random.Random(20261202)
    subjects = Subjects("bench")
    recorded = []
    for index in range(decisions):
        request = _request(index, rng)
        document = policy_input(request)
        effect, reasons = judge_input(engine, document)
        made = DecisionMade(
            decision_id=f"D{index:08d}",
            request_type=request.type,
            request_id=request.id,
            request_seq=index + 1,
            effect=effect,
            reasons=list(reasons),
            policy_revision=engine.revision,
            evaluation_ms=0.1,
            input=document,
        )
        event = make_envelope(
            made, tenant=request.tenant, entity_id=request.entity_id, actor="policy-gate", source="policy-gate"
        )
        subject = subjects.decision_on(request.tenant, type(request.data), request.entity_id)
        what = RecordedDecision(
            0, made.decision_id, request.tenant, request.entity_id, request.type,
            event.time.isoformat(), effect, reasons, engine.revision, document,
        )  # fmt: skip
        recorded.append((subject, event.to_bytes(), what))
    return recorded


def candidate_pack(directory: Path) -> Path:
    pack = Path(shutil.copytree(SHIPPED_POLICY_DIR, directory / "candidate"))
    data = json.loads((pack / "data.json").read_text())
    data["warden"]["tools"]["web.fetch"]["allowed_domains"].remove(REMOVED_DOMAIN)
    (pack / "data.json").write_text(json.dumps(data))
    return pack


def expected_flips(recorded: list[RecordedDecision]) -> int:
    return sum(
        1
        for decision in recorded
        if decision.effect == "allow" and REMOVED_DOMAIN in json.dumps((decision.input or {}).get("tool"))
    )


async def _store(nats_url: str, events: list[tuple[str, bytes, RecordedDecision]]) -> None:
    nc = await admin_connect(nats_url)
    try:
        js = nc.jetstream()
        for config in stream_configs(Subjects("bench")):
            await js.add_stream(config)
        for start in range(0, len(events), 2000):
            acks = [await js.publish_async(subject, body) for subject, body, _ in events[start : start + 2000]]
            await asyncio.gather(*acks)
    finally:
        await nc.close()


async def run(decisions: int) -> dict[str, Any]:
    engine = PolicyEngine.load(SHIPPED_POLICY_DIR)
    started = time.perf_counter()
    events = history(decisions, engine)
    recorded = [decision for _, _, decision in events]
    print(f"history of {decisions} decisions made in {time.perf_counter() - started:.1f} s", flush=True)
    flips = expected_flips(recorded)
    candidate = candidate_pack(Path(tempfile.mkdtemp(prefix="warden-bench-candidate-")))
    cpus = os.cpu_count() or 1
    result: dict[str, Any] = {"decisions": decisions, "cpus": cpus, "expected_effect_flips": flips, "passes": []}
    async with embedded("interval") as (nats_url, _):
        await _store(nats_url, events)
        nc = await admin_connect(nats_url)
        try:
            read_started = time.perf_counter()
            stored: list[tuple[int, bytes]] = []
            await read_decision_events(nc, "bench", lambda seq, body: stored.append((seq, body)))
            read_seconds = time.perf_counter() - read_started
            # As `warden policy replay` runs: each decision to the judges as it is read.
            whole_started = time.perf_counter()
            with PolicyReplay(candidate) as replay:
                await read_decision_events(nc, "bench", replay.add, progress=replay.reading)
                whole = replay.finish()
            whole_seconds = time.perf_counter() - whole_started
        finally:
            await nc.close()
    assert len(stored) == decisions, len(stored)
    assert whole.unreadable == 0, whole.unreadable
    assert (whole.replayed, len(whole.effect_flips)) == (decisions, flips), (whole.replayed, len(whole.effect_flips))
    result["read_per_second"] = round(decisions / read_seconds)
    result["end_to_end_per_second"] = round(decisions / whole_seconds)
    for workers in sorted({1, cpus}):
        # From the first judged chunk on, the workers are up: the rate after it is what they sustain.
        first: list[tuple[float, int]] = []

        def progress(replayed: int, _added: int, first: list[tuple[float, int]] = first) -> None:
            if not first:
                first.append((time.perf_counter(), replayed))

        report = replay_events(stored, candidate, workers=workers, progress=progress)
        ended = time.perf_counter()
        assert len(report.effect_flips) == flips, (len(report.effect_flips), flips)
        assert set(report.transitions()) == {"allow -> deny"}, report.transitions()
        ((first_at, first_count),) = first
        sustained = (report.replayed - first_count) / (ended - first_at)
        result["passes"].append(
            {
                "workers": workers,
                "seconds": round(report.seconds, 3),
                "decisions_per_second": round(report.decisions_per_second),
                "sustained_per_second": round(sustained),
            }
        )
        print(
            f"{workers} worker(s): {report.decisions_per_second:,.0f} decisions/s re-decided, start-up included; "
            f"{sustained:,.0f}/s once the first chunk is judged",
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    result = asyncio.run(run(parser.parse_args().decisions))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy_replay.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"read from JetStream alone: {result['read_per_second']:,}/s; whole replay as the CLI runs it (read "
        f"and re-decided at once, {result['cpus']} CPU(s)): {result['end_to_end_per_second']:,} decisions/s; "
        f"{result['expected_effect_flips']} allow -> deny flips found, as expected"
    )


if __name__ == "__main__":
    main()
