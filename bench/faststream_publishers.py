"""FastStream 0.7.8's JetStream publishing against nats-py's, as Warden's services publish: CPU per message.

    uv run python -m bench.faststream_publishers [--messages 5000] [--rounds 3]

Each variant stores the same N ~300-byte JSON messages, with Warden's headers (dedup key, type),
into a stream of its own, one acknowledged publish at a time (as the gate answers a command: the
answer must be stored before the command is acknowledged):

1. nats-py: `js.publish(subject, body, headers=..., stream=...)`.
2. FastStream broker: `broker.publish(body, subject, headers=..., stream=...)` on a broker built as
   Warden's services build theirs.
3. FastStream publisher: `broker.publisher(subject, stream=JStream(declare=False))`, then
   `publisher.publish(body, headers=...)`: the form FastStream's AsyncAPI generation describes.
4. nats-py pipelined: `js.publish_async(...)` for every message, then the acknowledgements awaited
   together, as the gate sends its answers and the scheduler its dispatches. FastStream 0.7.8 has
   no such form: each publish waits for its acknowledgement.

The variants run interleaved, `--rounds` times over, in a rotated order; figures are medians over
rounds, ratios the medians of per-round ratios to nats-py. CPU is this process's, and the embedded
nats-server's alongside. Prints a table and writes bench/results/faststream_publishers.json.
"""

import argparse
import asyncio
import json
import logging
import statistics
import time
from typing import Any, Literal

from faststream.nats import JStream, NatsBroker

from bench.common import admin_broker_options, admin_connect
from bench.faststream_consumers import RESULTS, Target, message_body, process_cpu, with_servers
from warden.wire import MSG_ID_HEADER, SERVICE_CONNECT_OPTIONS, TYPE_HEADER, server_urls

Variant = Literal["nats_py", "faststream_broker", "faststream_publisher", "nats_py_pipelined"]
VARIANTS: tuple[Variant, ...] = ("nats_py", "faststream_broker", "faststream_publisher", "nats_py_pipelined")
LABELS: dict[Variant, str] = {
    "nats_py": "1. nats-py js.publish",
    "faststream_broker": "2. FastStream broker.publish",
    "faststream_publisher": "3. FastStream publisher object",
    "nats_py_pipelined": "4. nats-py js.publish_async",
}


def headers(seq: int) -> dict[str, str]:
    return {MSG_ID_HEADER: f"bench-{seq}", TYPE_HEADER: "step.completed", "content-type": "application/json"}


async def measure(nats_url: str, variant: Variant, messages: int, server_pid: int | None) -> dict[str, Any]:
    """One variant, once, into a fresh stream; connections are open before the clock starts."""
    admin = await admin_connect(nats_url)
    target = await Target.create(admin)
    bodies = [message_body(seq) for seq in range(messages)]
    broker = NatsBroker(
        server_urls(nats_url),
        logger=logging.getLogger("bench"),
        log_level=logging.DEBUG,
        **SERVICE_CONNECT_OPTIONS,
        **admin_broker_options(nats_url),
    )
    nc = None
    try:
        if variant in ("nats_py", "nats_py_pipelined"):
            nc = await admin_connect(nats_url, **SERVICE_CONNECT_OPTIONS)
            js = nc.jetstream()
        else:
            publisher = broker.publisher(target.subject, stream=JStream(name=target.stream, declare=False))
            await broker.start()
        cpu, server_cpu, started = time.process_time(), process_cpu(server_pid), time.perf_counter()
        if variant == "nats_py_pipelined":
            acks = [
                await js.publish_async(target.subject, body, headers=headers(seq), stream=target.stream)
                for seq, body in enumerate(bodies)
            ]
            await asyncio.gather(*acks)
        for seq, body in enumerate(bodies if variant != "nats_py_pipelined" else ()):
            if variant == "nats_py":
                await js.publish(target.subject, body, headers=headers(seq), stream=target.stream)
            elif variant == "faststream_broker":
                await broker.publish(body, target.subject, headers=headers(seq), stream=target.stream)
            else:
                await publisher.publish(body, headers=headers(seq))
        seconds = time.perf_counter() - started
        cpu, server_cpu = time.process_time() - cpu, process_cpu(server_pid) - server_cpu
        stored = (await admin.jetstream().stream_info(target.stream)).state.messages
    finally:
        if nc is not None:
            await nc.close()
        await broker.stop()
        await target.delete(admin)
        await admin.close()
    return {
        "messages_per_second": round(messages / seconds),
        "cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "nats_server_cpu_us_per_message": round(server_cpu / messages * 1e6, 1),
        "all_stored": stored == messages,
    }


async def run(nats_url: str, messages: int, rounds: int, server_pid: int | None) -> dict[str, Any]:
    per_round: list[dict[Variant, dict[str, Any]]] = []
    for index in range(rounds):
        order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
        per_round.append({variant: await measure(nats_url, variant, messages, server_pid) for variant in order})
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        figures = [measured[variant] for measured in per_round]
        summary[variant] = {
            "label": LABELS[variant],
            "messages_per_second": round(statistics.median(f["messages_per_second"] for f in figures)),
            "cpu_us_per_message": round(statistics.median(f["cpu_us_per_message"] for f in figures), 1),
            "nats_server_cpu_us_per_message": round(
                statistics.median(f["nats_server_cpu_us_per_message"] for f in figures), 1
            ),
            "cpu_ratio_to_nats_py": round(
                statistics.median(
                    m[variant]["cpu_us_per_message"] / m["nats_py"]["cpu_us_per_message"] for m in per_round
                ),
                2,
            ),
            "rate_ratio_to_nats_py": round(
                statistics.median(
                    m[variant]["messages_per_second"] / m["nats_py"]["messages_per_second"] for m in per_round
                ),
                2,
            ),
            "all_stored": all(f["all_stored"] for f in figures),
            "rounds": figures,
        }
    return {"messages": messages, "rounds": rounds, "variants": summary}


def table(result: dict[str, Any]) -> str:
    lines = [
        f"JetStream publishing, {result['messages']:,} acknowledged publishes (1-3 one at a time, 4 pipelined), "
        f"{result['rounds']} rounds ({result['servers']})",
        f"  {'variant':<34} {'msgs/s':>8} {'CPU µs/msg':>11} {'server µs':>10} {'CPU vs 1':>9} {'stored':>7}",
    ]
    for figures in result["variants"].values():
        lines.append(
            f"  {figures['label']:<34} {figures['messages_per_second']:>8,} {figures['cpu_us_per_message']:>11} "
            f"{figures['nats_server_cpu_us_per_message']:>10} {figures['cpu_ratio_to_nats_py']:>9} "
            f"{figures['all_stored']!s:>7}"
        )
    return "\n".join(lines)


async def main(messages: int, rounds: int) -> None:
    result = await with_servers(lambda url, pid: run(url, messages, rounds, pid))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "faststream_publishers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.messages, arguments.rounds))
