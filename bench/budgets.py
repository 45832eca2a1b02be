"""The budget ledger under contention: reservations per second on one budget, one caller against many.

    uv run --group bench python -m bench.budgets [--calls 4000]

Each call reserves one tool call on the same key of the ledger (a JetStream key-value bucket,
compare-and-set on the key's revision) and settles it, as a runner does around a tool call: 1, 8
and 32 callers at once, in one process (one runner), whose ledger takes its calls' changes to a
key in turn. Reported: calls per second, latency of reserve plus settle (p50, p95), writes that
lost a compare-and-set race per call, and that the ledger is exact afterwards. NATS syncs every
write to disk. Writes bench/results/budgets.json.
"""

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from nats.js.api import KeyValueConfig, StorageType

from bench.common import admin_connect, embedded
from bench.run import RESULTS
from warden.agent_runner.budgets import Amount, Balance, Budget, Ledger, Limits

ONE_CALL = Amount(tool_calls=1, cost_nanousd=1000)


class ReadCountingLedger(Ledger):
    """The ledger, counting balance reads: each change reads once, plus once per race it lost."""

    reads = 0

    async def balance(self, key: str) -> tuple[Balance, int | None]:
        self.reads += 1
        return await super().balance(key)


async def _pass(ledger: "ReadCountingLedger", key: str, callers: int, calls: int) -> dict[str, Any]:
    budget = Budget(key, f"budget {key}", Limits(tool_calls=calls))
    latencies: list[float] = []
    reads_before = ledger.reads

    async def caller(index: int) -> None:
        for n in range(index, calls, callers):
            started = time.perf_counter()
            refusal = await ledger.reserve(budget, f"c{n}", ONE_CALL)
            assert refusal is None, refusal
            await ledger.settle(budget, f"c{n}", ONE_CALL)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - started
    balance, _ = await ledger.balance(key)
    assert balance.spent == Amount(tool_calls=calls, cost_nanousd=calls * 1000), balance
    assert balance.held == {}
    reads = ledger.reads - reads_before
    latencies.sort()
    return {
        "callers": callers,
        "calls": calls,
        "calls_per_second": round(calls / elapsed, 1),
        "reserve_and_settle_ms_p50": round(statistics.median(latencies), 2),
        "reserve_and_settle_ms_p95": round(latencies[int(len(latencies) * 0.95)], 2),
        # Two changes per call (reserve, settle); every read beyond one per change is a lost race.
        "conflicts_per_call": round((reads - 2 * calls) / calls, 2),
        "ledger_exact": True,
    }


async def run(calls: int) -> dict[str, Any]:
    async with embedded("always") as (nats_url, _):
        nc = await admin_connect(nats_url)
        try:
            js = nc.jetstream()
            await js.create_key_value(KeyValueConfig(bucket="BENCH_LEDGER", history=1, storage=StorageType.FILE))
            ledger = ReadCountingLedger(js, "BENCH_LEDGER")
            passes = [await _pass(ledger, f"tenant.t{callers}", callers, calls) for callers in (1, 8, 32)]
        finally:
            await nc.close()
    one = passes[0]["calls_per_second"]
    return {
        "durability": "always",
        "passes": passes,
        "throughput_32_to_1": round(passes[2]["calls_per_second"] / one, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000)
    result = asyncio.run(run(parser.parse_args().calls))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "budgets.json").write_text(json.dumps(result, indent=2) + "\n")
    for one in result["passes"]:
        print(
            f"{one['callers']:>2} callers: {one['calls_per_second']} calls/s, reserve+settle p50 "
            f"{one['reserve_and_settle_ms_p50']} ms p95 {one['reserve_and_settle_ms_p95']} ms, "
            f"{one['conflicts_per_call']} lost races per call, ledger exact"
        )
    print(f"throughput with 32 callers / 1 caller: {result['throughput_32_to_1']}")


if __name__ == "__main__":
    main()
