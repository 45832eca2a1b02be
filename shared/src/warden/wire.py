"""What every Warden message carries on the wire, and how to reach the servers: needs only nats-py.

The client imports this module; so do the services (`warden.bus` adds what only they need:
retries and trace propagation; `warden.consumers` how they consume JetStream).
"""

import secrets
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from warden.messages import Envelope

MSG_ID_HEADER = "Nats-Msg-Id"
TYPE_HEADER = "Warden-Type"
# How a long-lived service connects: it never gives up reconnecting (a cluster's leader election
# or a restarted node is waited out, not a reason to exit), and tries again promptly.
SERVICE_CONNECT_OPTIONS: dict[str, Any] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}


def server_urls(url: str) -> list[str]:
    """The servers a NATS URL setting names: one URL, or a cluster's seed nodes separated by commas.

    nats-py takes the list and connects to whichever answers, so a client or service starts
    while one seed node is down.
    """
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS server in {url!r}")
    return urls


async def connect(url: str, **options: Any) -> NatsClient:
    """A nats-py connection to the servers `url` names (see `server_urls`)."""
    return await nats.connect(server_urls(url), **options)


def command_key_scope(tenant: str, type_name: str) -> str:
    """What every command's Nats-Msg-Id starts with (see `envelope_headers`)."""
    return f"{tenant}:{type_name}:"


def message_headers(envelope: Envelope[Any], idempotency_key: str | None = None) -> dict[str, str]:
    """Headers for one message: JetStream's dedup key, and the type (for routing without parsing).

    The idempotency key defaults to the envelope id, so a retried publish of the same envelope is
    stored once; clients pass their own key to make a retried *request* idempotent too. JetStream
    deduplicates over the whole stream, so a command's key is scoped by its tenant and type
    (`acme:run.submitted:ticket-42`): two tenants using the same key never collide, and the gate
    refuses a command whose key claims another tenant's scope.
    """
    key = idempotency_key or envelope.id
    if envelope.data.KIND == "command":
        key = command_key_scope(envelope.tenant, envelope.type) + key
    return {MSG_ID_HEADER: key, TYPE_HEADER: envelope.type, "content-type": "application/json"}


def new_traceparent() -> str:
    """A W3C `traceparent` for a fresh trace: where a run's trace begins when no span is current."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


# Bus failures that pass: no server answering for a stream (a leader election in a cluster, a node
# restarting), a request timing out, a connection being re-established. Anything else (a stream
# that does not exist, a refused request) is not retried.
_TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a bus error may pass if the same operation is tried again."""
    return isinstance(exc, _TRANSIENT)
