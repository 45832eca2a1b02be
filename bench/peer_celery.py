"""W3 peer: the researcher agent's five steps as an ungoverned Celery chain, each step writing one row to Postgres.

    uv run --group bench python -m bench.peer_celery [--runs 500] [--concurrency 32] [--brokers redis amqp]

Starts Celery workers (prefork, threads and solo pools at a few sizes), drives `runs` chains through each
with at most `concurrency` in flight, checks every run wrote its 5 rows, prints the table and the best,
and writes bench/results/peer_celery.json. Needs Redis on 127.0.0.1:6379 (broker and result backend)
and Postgres, and RabbitMQ on 127.0.0.1:5672 for the `amqp` broker (`--brokers redis` skips it).
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import psycopg
import redis
from celery import Celery, chain
from psycopg.types.json import Jsonb

from warden.agent_runner.tools import run_tool

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
STEPS: list[dict[str, Any]] = json.loads((ROOT / "agents" / "researcher.json").read_text())["steps"]
REDIS_URL = "redis://127.0.0.1:6379/{db}"
BROKERS = {"redis": REDIS_URL, "amqp": "amqp://guest:guest@127.0.0.1:5672//"}
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# (pool, size): prefork/threads are one worker with `size` children or threads; solo is `size` worker processes.
CONFIGS = [("prefork", 2), ("prefork", 4), ("prefork", 8), ("threads", 8), ("threads", 16), ("threads", 32)]
CONFIGS += [("solo", 2), ("solo", 3), ("solo", 4)]

# The workers are processes this module starts, so their settings travel in the environment.
app = Celery("peer", broker=os.environ.get("PEER_BROKER"), backend=os.environ.get("PEER_BACKEND"))
app.conf.update(task_default_queue=os.environ.get("PEER_QUEUE", "peer"), result_expires=600)
_local = threading.local()


def _step(run_id: str, index: int) -> str:
    """Do step `index` of the researcher script and record it; returns `run_id` for the next link of the chain."""
    if not hasattr(_local, "conn"):
        # One connection and one event loop per worker thread or (forked) process, made on first use.
        _local.conn = psycopg.connect(os.environ["PEER_DATABASE_URL"], autocommit=True)
        _local.loop = asyncio.new_event_loop()
    spec = STEPS[index]
    if "tool_call" in spec:  # the very tool function Warden's agent runner calls
        kind, call = "tool_call", spec["tool_call"]
        result = _local.loop.run_until_complete(run_tool(call["tool"], call["arguments"]))
    else:  # a scripted model turn is bookkeeping only, as in Warden
        kind, result = "model_turn", spec["model_turn"]
    _local.conn.execute(
        "INSERT INTO peer_steps (run_id, step, kind, result, at) VALUES (%s, %s, %s, %s, now())",
        (run_id, index, kind, Jsonb(result)),
    )
    return run_id


step = app.task(name="peer.step")(_step)


def _check_reachable(client: Celery, broker_url: str, backend_url: str) -> None:
    try:
        redis.Redis.from_url(backend_url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        raise SystemExit(
            f"peer_celery: Redis is not reachable at {backend_url} ({error}); start redis-server"
        ) from error
    try:
        with client.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as error:
        raise SystemExit(f"peer_celery: the broker is not reachable at {broker_url} ({error})") from error


def _start_workers(pool: str, size: int, env: dict[str, str], queue: str) -> list[subprocess.Popen[bytes]]:
    processes, concurrency = (size, 1) if pool == "solo" else (1, size)
    command = [sys.executable, "-m", "celery", "-A", "bench.peer_celery", "worker", "--pool", pool]
    command += ["--concurrency", str(concurrency), "-Q", queue, "--loglevel", "WARNING"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]  # no chatter between workers
    # A new session per worker, so stopping it can reach its children too and leave no orphans.
    return [
        subprocess.Popen(
            [*command, "-n", f"{queue}-{i}@%h"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True
        )
        for i in range(processes)
    ]


def _wait_ready(client: Celery, workers: list[subprocess.Popen[bytes]], queue: str) -> None:
    names = [f"{queue}-{i}@{os.uname().nodename}" for i in range(len(workers))]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(worker.poll() is not None for worker in workers):
            raise RuntimeError("a Celery worker exited while starting; see its output above")
        replies = client.control.ping(destination=names, timeout=0.5)
        if len({name for reply in replies for name in reply}) == len(names):
            return
    raise RuntimeError(f"Celery workers {names} did not answer a ping within 60 s")


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the worker stops its own pool
    for worker in workers:
        try:
            worker.wait(timeout=30)
        finally:
            with suppress(ProcessLookupError):  # anything left in the worker's own session
                os.killpg(worker.pid, signal.SIGKILL)


def run_peer(
    runs: int,
    concurrency: int,
    pool: str,
    workers: int,
    *,
    broker: str = "redis",
    database_url: str,
    redis_db: int = 15,
) -> dict[str, Any]:
    """Drive `runs` chains through `workers` of `pool` with at most `concurrency` in flight; return the rates."""
    queue = f"peer-{uuid.uuid4().hex[:8]}"  # a private queue: nothing else on this Redis or RabbitMQ is touched
    backend_url = REDIS_URL.format(db=redis_db)
    broker_url = BROKERS[broker].format(db=redis_db)
    env = {**os.environ, "PEER_BROKER": broker_url, "PEER_BACKEND": backend_url}
    env |= {"PEER_QUEUE": queue, "PEER_DATABASE_URL": database_url}
    env["PYTHONWARNINGS"] = "ignore:You're running the worker with superuser privileges"  # as root in containers
    client = Celery("peer-client", broker=broker_url, backend=backend_url)
    client.conf.update(task_default_queue=queue, result_expires=600)
    _check_reachable(client, broker_url, backend_url)
    started = _start_workers(pool, workers, env, queue)
    run_ids: list[str] = []

    def one_run(_: int) -> float:
        run_id = str(uuid.uuid4())
        run_ids.append(run_id)
        # Only the last link's result is needed; the others pass theirs on in the chain's messages.
        links = [client.signature("peer.step", args=(run_id, 0), ignore_result=True)]
        links += [
            client.signature("peer.step", args=(i,), ignore_result=i < len(STEPS) - 1) for i in range(1, len(STEPS))
        ]
        begin = time.perf_counter()
        chain(*links).apply_async().get(timeout=120)
        return time.perf_counter() - begin

    try:
        _wait_ready(client, started, queue)
        with ThreadPoolExecutor(concurrency) as executor:  # a closed loop: each thread has one run in flight
            list(executor.map(one_run, range(min(runs, 2 * concurrency))))  # warm-up: connections, imports
            begin = time.perf_counter()
            latencies = sorted(executor.map(one_run, range(runs)))
            elapsed = time.perf_counter() - begin
    finally:
        _stop_workers(started)
        with client.connection_for_write() as connection:  # leave no queue or binding behind on the broker
            bound = client.amqp.queues[queue](connection.default_channel)
            bound.declare()  # so the Redis transport knows the bindings it must delete
            bound.delete()
        client.close()
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT run_id, count(*), count(DISTINCT step) FROM peer_steps GROUP BY run_id").fetchall()
        conn.execute("TRUNCATE peer_steps")
    counts = {run_id: (total, distinct) for run_id, total, distinct in rows}
    bad = [run_id for run_id in run_ids if counts.pop(run_id, None) != (len(STEPS), len(STEPS))]
    if bad or counts:
        raise RuntimeError(f"{len(bad)} runs did not write exactly their {len(STEPS)} rows; {len(counts)} stray runs")
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "pool": pool,
        "workers": workers,
        "broker": broker,
        "runs": runs,
        "runs_per_second": round(runs / elapsed, 1),
        "p50_ms": round(cuts[49] * 1000, 1),
        "p99_ms": round(cuts[98] * 1000, 1),
    }


def tune(
    runs: int,
    concurrency: int = 32,
    *,
    brokers: tuple[str, ...] = ("redis", "amqp"),
    admin_url: str = DEFAULT_DATABASE_URL,
    redis_db: int = 15,
    configs: list[tuple[str, int]] | None = None,
) -> list[dict[str, Any]]:
    """Try each pool and size (default: CONFIGS) on each broker, in a fresh database `peer_<random>`, dropped after."""
    name = f"peer_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    database_url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE peer_steps (run_id text, step int, kind text, result jsonb, at timestamptz)")
        results = []
        for broker in brokers:
            for pool, size in configs or CONFIGS:
                result = run_peer(
                    runs, concurrency, pool, size, broker=broker, database_url=database_url, redis_db=redis_db
                )
                print(json.dumps(result), flush=True)
                results.append(result)
        return results
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description="Tune the Celery peer of workload W3.")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32, help="runs in flight at once (closed loop)")
    parser.add_argument("--brokers", nargs="+", choices=sorted(BROKERS), default=["redis", "amqp"])
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="Postgres to create peer_<random> in")
    parser.add_argument("--redis-db", type=int, default=15)
    args = parser.parse_args()
    begin = time.perf_counter()
    results = tune(
        args.runs, args.concurrency, brokers=tuple(args.brokers), admin_url=args.database_url, redis_db=args.redis_db
    )
    best = max(results, key=lambda result: result["runs_per_second"])
    print(f"\n{'broker':<7}{'pool':<9}{'workers':>8}{'runs/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for r in results:
        print(
            f"{r['broker']:<7}{r['pool']:<9}{r['workers']:>8}{r['runs_per_second']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}"
        )
    print(f"best: {best['broker']} {best['pool']} ×{best['workers']}: {best['runs_per_second']} runs/s")
    RESULTS.mkdir(exist_ok=True)
    summary = {"runs": args.runs, "concurrency": args.concurrency, "best": best, "results": results}
    summary["seconds"] = round(time.perf_counter() - begin, 1)
    (RESULTS / "peer_celery.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
