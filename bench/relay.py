"""The W1 floor: a relay that stores each command, reads it back and stores it again, with no Warden code.

    python -m bench.relay NATS_URL PREFIX SEED_FILE

It makes the same two persisted hops as the policy gate (client -> commands stream, relay ->
a stream configured like the events stream) using plain nats-py, so the difference between the
two is exactly what Warden adds: validation, policy evaluation, envelopes, FastStream.
"""

import asyncio
import sys

import nats
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


async def relay(nats_url: str, prefix: str, seed_file: str) -> None:
    nc = await nats.connect(nats_url, nkeys_seed=seed_file or None)
    js = nc.jetstream()

    async def forward(message: Msg) -> None:
        run_id = (message.headers or {}).get("Bench-Run", "unknown")
        await js.publish(f"{prefix}.rly.{run_id}", message.data)
        await message.ack()

    await js.subscribe(
        f"{prefix}.cmd.>",
        stream=f"{prefix.upper()}_COMMANDS",
        cb=forward,
        manual_ack=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1024),
    )
    print("relay ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(relay(sys.argv[1], sys.argv[2], sys.argv[3]))
