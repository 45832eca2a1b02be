"""Run every benchmark side by side with its baseline and write bench/results/ (JSON, markdown, PNG).

    uv run --group bench python -m bench.run            # the full set (about 15 minutes)
    uv run --group bench python -m bench.run --quick    # short runs, to check the harness

W1-W3 and W3llm run under both JetStream durability settings of the NATS configuration: fsync on every write
(`always`, the single-node default) and the 2-minute sync interval (`interval`). Every process
(NATS, Postgres, the services, the load generator) shares this machine; ratios are measured in
one run, so they compare like with like.
"""

import argparse
import asyncio
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Durability, embedded
from bench.decisions import run_w1, run_w2
from bench.halts import run_halts
from bench.llm_runs import run_w3_llm
from bench.runs import run_w3

RESULTS = Path(__file__).parent / "results"
IDLE_MEMORY_LIMIT_MB = 100
# Runs in flight for W3 and its peer: enough to saturate both on two cores.
W3_CONCURRENCY = 128
# Runs in flight in W3llm's closed loop (the figure; --quick uses 8, for a short check).
W3LLM_CONCURRENCY = 32
PEER_CONFIGS = [("prefork", 2), ("prefork", 4), ("threads", 16), ("threads", 32)]


async def run_all(quick: bool, only: set[str]) -> dict[str, Any]:
    scale = 0.2 if quick else 1.0
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "quick": quick,
    }
    durabilities: tuple[Durability, ...] = ("always", "interval")
    for durability in durabilities:
        async with embedded(durability) as (nats_url, admin_url):
            section: dict[str, Any] = {}
            if "W1" in only:
                section["W1"] = await run_w1(nats_url, admin_url, samples=int(3000 * scale))
                print(durability, "W1", json.dumps(section["W1"]), flush=True)
            if "W2" in only:
                section["W2"] = await run_w2(nats_url, admin_url, seconds=10 * scale, concurrency=128)
                print(durability, "W2", json.dumps(section["W2"]), flush=True)
            if "W3" in only:
                section["W3"] = await run_w3(nats_url, admin_url, runs=int(1500 * scale), concurrency=W3_CONCURRENCY)
                print(durability, "W3", json.dumps(section["W3"]), flush=True)
            if "W3llm" in only:
                section["W3llm"] = await run_w3_llm(
                    nats_url,
                    admin_url,
                    sequential_runs=int(200 * scale),
                    direct_per_run=5,
                    runs=int(600 * scale),
                    concurrency=8 if quick else W3LLM_CONCURRENCY,
                    label=f"{durability} W3llm",
                )
                print(durability, "W3llm", json.dumps(section["W3llm"]), flush=True)
            if "halts" in only:
                section["halts"] = await run_halts(nats_url, admin_url, repetitions=max(int(50 * scale), 2), runs=16)
                print(durability, "halts", json.dumps({k: v for k, v in section["halts"].items() if k != "raw"}))
            results[durability] = section
    if "W3" in only:
        from bench.peer_celery import tune  # noqa: PLC0415 (needs the bench group and Redis)

        # The same load as Warden's W3; the pools and sizes that did best when tuning on this machine
        # (`python -m bench.peer_celery` tries them all).
        peers = await asyncio.to_thread(tune, int(1500 * scale), W3_CONCURRENCY, configs=PEER_CONFIGS)
        results["W3_peer"] = {"tried": peers, "best": max(peers, key=lambda peer: peer["runs_per_second"])}
        print("W3 peer", json.dumps(results["W3_peer"]["best"]), flush=True)
    if "W4" in only:
        from bench.replay import run_w4  # noqa: PLC0415

        async with embedded("interval") as (nats_url, admin_url):
            results["W4"] = await run_w4(nats_url, admin_url, events=int(1_000_000 * scale))
        print("W4", json.dumps(results["W4"]), flush=True)
    results["targets"] = check_targets(results)
    return results


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmarks issue: what was measured, what was wanted, met or not."""
    targets: list[dict[str, Any]] = []

    def target(name: str, measured: float, wanted: float, higher_is_better: bool = True) -> None:
        met = measured >= wanted if higher_is_better else measured <= wanted
        targets.append({"target": name, "measured": measured, "wanted": wanted, "met": met})

    for durability in ("always", "interval"):
        section = results.get(durability, {})
        if "W1" in section:
            target(f"W1 p50 / floor p50 ({durability})", section["W1"]["p50_ratio"], 1.5, higher_is_better=False)
        if "W2" in section:
            w2 = section["W2"]
            best = max(w2["gates_1"]["decisions_per_second"], w2["gates_2"]["decisions_per_second"])
            if durability == "interval":
                target("W2 decisions/s (interval)", best, 10_000)
            else:
                target(
                    "W2 decisions/s vs 80% of raw publish / 2 (always)",
                    best,
                    round(0.8 * w2["raw_publish_floor_decisions_per_second"]),
                )
        if "W3" in section and "W3_peer" in results:
            peer = results["W3_peer"]["best"]["runs_per_second"]
            target(f"W3 runs/s vs 2x Celery best ({durability})", section["W3"]["runs_per_second_projected"], 2 * peer)
        if "W3" in section:
            for service, size in section["W3"]["resident_mb_idle"].items():
                target(f"idle memory MB: {service} ({durability})", size, IDLE_MEMORY_LIMIT_MB, higher_is_better=False)
        if "halts" in section:
            target(
                f"halts: last call in scope after the halt, max ms ({durability})",
                section["halts"]["last_call_after_ms"]["max"],
                1000,
                higher_is_better=False,
            )
    if "W4" in results:
        target("W4 replay events/s", results["W4"]["replay_events_per_second"], 50_000)
    return targets


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = [f"# Warden benchmarks ({results['started']}{', quick' if results['quick'] else ''})", ""]
    lines += ["| target | measured | wanted | met |", "| --- | ---: | ---: | :---: |"]
    for row in results["targets"]:
        lines.append(f"| {row['target']} | {row['measured']} | {row['wanted']} | {'yes' if row['met'] else 'NO'} |")
    for durability in ("always", "interval"):
        section = results.get(durability, {})
        lines += ["", f"## Durability: {durability}", ""]
        if "W1" in section:
            w1 = section["W1"]
            lines += [
                "W1, decision round trip (one client, closed loop):",
                "",
                "| path | p50 ms | p99 ms | p99.9 ms |",
                "| --- | ---: | ---: | ---: |",
            ]
            for path_name in ("relay", "warden"):
                row = w1[path_name]
                lines.append(f"| {path_name} | {row['p50_ms']} | {row['p99_ms']} | {row['p999_ms']} |")
            lines.append(f"\np50 ratio warden / relay floor: **{w1['p50_ratio']}**")
        if "W2" in section:
            w2 = section["W2"]
            lines += [
                "",
                "W2, decision throughput:",
                "",
                "| gates | decisions/s | p99 ms at saturation | p99 ms at half rate | CPU µs per decision |",
                "| ---: | ---: | ---: | ---: | --- |",
            ]
            for gates in (1, 2):
                row = w2[f"gates_{gates}"]
                lines.append(
                    f"| {gates} | {row['decisions_per_second']} | {row['saturation_latency']['p99_ms']} | "
                    f"{row['p99_ms_at_half_rate']} | {_per_role(row['cpu_us_per_decision'])} |"
                )
            lines.append(
                f"\nraw acknowledged publish: {w2['raw_publish_per_second']} msg/s with 256 in flight, as W2 has "
                f"({w2['raw_publish_per_second_window_1024']} msg/s with 1024); "
                f"{w2['persisted_messages_per_decision']} persisted messages per decision; floor "
                f"{w2['raw_publish_floor_decisions_per_second']} decisions/s. With the projector "
                f"running: {w2['with_projector']['decisions_per_second']} decisions/s, projection lag "
                f"{json.dumps(w2['with_projector']['lag'])}"
            )
        if "W3" in section:
            w3 = section["W3"]
            lines += [
                "",
                f"W3, governed runs ({w3['runs']} runs, {w3['concurrency']} in flight): "
                f"{w3['runs_per_second']} runs/s finished, {w3['runs_per_second_projected']} runs/s "
                f"projected; latency p50 {w3['latency']['p50_ms']} ms, p99 {w3['latency']['p99_ms']} ms; "
                f"resident MB idle {json.dumps(w3['resident_mb_idle'])}, peak {json.dumps(w3['resident_mb_peak'])}",
                "",
                f"CPU ms per run: {_per_role(w3['cpu_ms_per_run'])}",
            ]
        if "W3llm" in section:
            lines += ["", *_w3llm_lines(section["W3llm"])]
        if "halts" in section:
            lines += ["", *_halts_lines(section["halts"])]
    if "W3_peer" in results:
        lines += [
            "",
            "## W3 peer: Celery chain writing to Postgres, no governance",
            "",
            "| broker | pool | workers | runs/s | p50 ms | p99 ms |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for peer in results["W3_peer"]["tried"]:
            lines.append(
                f"| {peer['broker']} | {peer['pool']} | {peer['workers']} | {peer['runs_per_second']} | "
                f"{peer['p50_ms']} | {peer['p99_ms']} |"
            )
    if "W4" in results:
        lines += ["", "## W4, audit replay", "", "```json", json.dumps(results["W4"], indent=2), "```"]
    path.write_text("\n".join(lines) + "\n")


def _halts_lines(halts: dict[str, Any]) -> list[str]:
    """Halts: from a halt's decision being stored to the last call in its scope, and to its runs' end."""
    lines = [
        f"Halts ({halts['repetitions']} repetitions, {halts['runs_in_scope']} runs in scope calling a tool every "
        f"{halts['tool_call_every_ms']} ms, {halts['runs_out_of_scope']} out of scope), ms after the halt's "
        "decision was stored:",
        "",
        "| | p50 | p95 | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (("last_call_after_ms", "last call in scope stored"), ("all_ended_after_ms", "every run ended")):
        row = halts[key]
        lines.append(f"| {label} | {row['p50']} | {row['p95']} | {row['max']} |")
    return lines


def _w3llm_lines(w3llm: dict[str, Any]) -> list[str]:
    """W3llm: each governed operation beside the same operation made directly, then the closed loop."""
    sequential, concurrent = w3llm["sequential"], w3llm["concurrent"]
    direct, governed, overhead = sequential["direct"], sequential["governed"], sequential["overhead"]
    lines = [
        f"W3llm, governed `{w3llm['agent']}` runs on the offline model (2 model turns, 2 tool calls each) beside "
        f"the same conversation made directly with no Warden; sequential: {sequential['runs']} runs, "
        f"{sequential['direct_conversations']} direct conversations, alternating:",
        "",
        "| operation | direct p50 ms | direct p99 ms | governed p50 ms | governed p99 ms | of which gate p50 ms "
        "| overhead p50 ms | overhead p99 ms | governed / direct p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, direct_key, governed_key, gate_key in (
        ("model turn", "model_call", "model_turn", "model_turn_gate"),
        ("tool call", "tool_call", "tool_call", "tool_call_gate"),
        ("whole run", "conversation", "run", None),
    ):
        gate = governed[gate_key]["p50_ms"] if gate_key else ""
        lines.append(
            f"| {name} | {direct[direct_key]['p50_ms']} | {direct[direct_key]['p99_ms']} | "
            f"{governed[governed_key]['p50_ms']} | {governed[governed_key]['p99_ms']} | {gate} | "
            f"{overhead[governed_key]['p50_ms']} | {overhead[governed_key]['p99_ms']} | "
            f"{overhead[governed_key]['p50_ratio']} |"
        )
    lines += [
        "",
        "Governed times are between stored events (request stored to result stored; the gate part: request "
        "to decision stored); overhead is governed minus direct, quantile by quantile.",
        "",
        f"Concurrent ({concurrent['runs']} runs, {concurrent['concurrency']} in flight): "
        f"{concurrent['runs_per_second']} runs/s finished, {concurrent['runs_per_second_projected']} runs/s "
        f"projected; latency p50 {concurrent['latency']['p50_ms']} ms, p99 {concurrent['latency']['p99_ms']} ms; "
        f"{concurrent['model_requests_per_run']} model requests per run",
        "",
        f"CPU ms per run: {_per_role(concurrent['cpu_ms_per_run'])}",
    ]
    return lines


def _per_role(spent: dict[str, float]) -> str:
    return ", ".join(f"{role} {amount}" for role, amount in spent.items())


def write_chart(results: dict[str, Any], path: Path) -> None:
    """One bar per target: measured as a fraction of wanted (for 'lower is better', wanted / measured)."""
    import matplotlib  # noqa: PLC0415 (bench group only)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [row for row in results["targets"] if not row["target"].startswith("idle memory")]
    scores = []
    for row in rows:
        lower_is_better = "p50 / floor" in row["target"] or row["target"].startswith("halts")
        # A halt's last call may come before its decision (negative ms): as good as it gets, drawn as 2.
        measured = max(row["measured"], row["wanted"] / 2) if lower_is_better else row["measured"]
        score = row["wanted"] / measured if lower_is_better else measured / row["wanted"]
        scores.append(score)
    figure, axes = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    colours = ["tab:green" if row["met"] else "tab:red" for row in rows]
    axes.barh([row["target"] for row in rows], scores, color=colours)
    axes.axvline(1.0, color="black", linewidth=1)
    axes.set_xlabel("measured relative to target (1.0 = target met exactly; right is better)")
    axes.set_title("Warden benchmarks against their targets")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, to check the harness")
    parser.add_argument("--only", default="W1,W2,W3,W3llm,W4", help="comma-separated workloads")
    parser.add_argument(
        "--name",
        default="results",
        help="results file names (bench/results/NAME.json, .md, .png): keep a partial run apart",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    results = asyncio.run(run_all(args.quick, set(args.only.split(","))))
    results["seconds"] = round(time.perf_counter() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, RESULTS / f"{args.name}.md")
    write_chart(results, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
