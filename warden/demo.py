"""`warden demo`: start the embedded stack, send a good and a bad command, show the audit trail, stop."""

import asyncio
import os
import signal

import asyncpg

from shared.settings import Settings
from shared.subjects import Subjects
from warden.client import WardenClient
from warden.stack import run_stack, settings_for_running_stack

TENANT = "acme"


async def _wait_for(pool: asyncpg.Pool, query: str, *args: object, within: float = 20.0) -> object:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        try:
            if value := await pool.fetchval(query, *args):
                return value
        except asyncpg.UndefinedTableError:
            pass  # the projector has not created its tables yet
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the audit trail did not show the demo's messages within {within}s")


async def _show_audit(settings: Settings) -> None:
    async with await WardenClient.connect(settings.nats_url, settings.subject_prefix) as client:
        receipt = await client.submit_run(tenant=TENANT, agent="demo", actor="alice", input={"question": "status?"})
        retry = await client.submit_run(tenant=TENANT, agent="demo", actor="alice", run_id=receipt.subject_id)
        bad = await client.js.publish(Subjects(settings.subject_prefix).command(TENANT, "run.submitted"), b"{oops")
    print(f"\nsubmitted run {receipt.subject_id} (stream seq {receipt.stream_seq}); "
          f"the retried submit was {'deduplicated' if retry.duplicate else 'stored twice (!)'}")  # fmt: skip
    print(f"published a malformed command (stream seq {bad.seq})\n")

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await _wait_for(pool, "SELECT count(*) FROM rejected_commands WHERE command_stream_seq = $1", bad.seq)
        await _wait_for(pool, "SELECT count(*) FROM runs WHERE run_id = $1", receipt.subject_id)
        print("audit trail (Postgres `events`, projected from JetStream):")
        for row in await pool.fetch("SELECT stream, stream_seq, type, tenant, actor, invalid_reason FROM events "
                                    "ORDER BY stream, stream_seq"):  # fmt: skip
            what = row["type"] or f"(stored raw: {row['invalid_reason']})"
            print(f"  {row['stream']:>16} #{row['stream_seq']:<3} {row['tenant']:<6} {row['actor'] or '-':<14} {what}")
        run = await pool.fetchrow("SELECT run_id, agent, status, submitted_by FROM runs WHERE run_id = $1",
                                  receipt.subject_id)  # fmt: skip
        print(f"\nruns: {dict(run) if run else None}")
        for row in await pool.fetch("SELECT command_stream_seq, code, reason FROM rejected_commands"):
            print(f"rejected command #{row['command_stream_seq']}: {row['code']}: {row['reason']}")
    finally:
        await pool.close()


async def run_demo(settings: Settings) -> None:
    ready = asyncio.Event()
    stack = asyncio.create_task(run_stack(settings, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({stack, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if stack.done():
        waiter.cancel()
        stack.result()
        return
    try:
        await _show_audit(settings_for_running_stack(settings))
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # run_stack's own signal handler stops everything it started
        await stack
