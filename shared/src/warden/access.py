"""Who read an installation's streams: the server's own record of JetStream API requests, read back.

nats-server reports every JetStream API request as an `api_audit` advisory: the identity that
asked (`client.user`, its public key), the request's subject and body. The access stream
(`warden.streams.ACCESS_STREAM`) keeps them. Reading the record is itself a request, so it is
recorded too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from warden.errors import WardenError
from warden.reader import FilteredReader
from warden.streams import ACCESS_SUBJECT, StreamNames

API_AUDIT_TYPE = "io.nats.jetstream.advisory.v1.api_audit"


class NoAccessRecord(WardenError):
    """The server keeps no record of API requests (the access stream was never provisioned)."""


@dataclass(frozen=True)
class Access:
    """One JetStream API request, as the server reported it."""

    time: datetime
    public_key: str | None  # the identity that asked (None: one the server did not name)
    client_name: str | None
    request_subject: str  # $JS.API....
    filter_subjects: tuple[str, ...]  # what a consumer it created reads, if it created one

    def concerns(self, streams: Iterable[str]) -> bool:
        tokens = self.request_subject.split(".")
        return any(stream in tokens for stream in streams)


def parse_access(data: bytes) -> Access | None:
    """The access an `api_audit` advisory reports; None for any other message."""
    try:
        advisory: dict[str, Any] = json.loads(data)
    except ValueError:
        return None
    if not isinstance(advisory, dict) or advisory.get("type") != API_AUDIT_TYPE:
        return None
    client = advisory.get("client") or {}
    subject = str(advisory.get("subject", ""))
    return Access(
        time=datetime.fromisoformat(str(advisory["timestamp"]).replace("Z", "+00:00")),
        public_key=client.get("user") or client.get("nkey"),
        client_name=client.get("name"),
        request_subject=subject,
        filter_subjects=_filters(subject, advisory.get("request")),
    )


def _filters(subject: str, request: object) -> tuple[str, ...]:
    try:
        body = json.loads(request) if isinstance(request, str) and request else {}
    except ValueError:
        body = {}
    config = body.get("config", {}) if isinstance(body, dict) else {}
    found = [config.get("filter_subject"), *(config.get("filter_subjects") or [])]
    # warden.reader names the filter in the subject: $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>
    parts = subject.split(".")
    if parts[2:4] == ["CONSUMER", "CREATE"] and len(parts) > 6:
        found.append(".".join(parts[6:]))
    return tuple(dict.fromkeys(str(value) for value in found if value))


# How long reading the record back may take before it is given up (it is read to a known end).
READ_TIMEOUT_SECONDS = 30.0


async def read_access(nc: NatsClient, streams: StreamNames) -> list[Access]:
    """Every recorded request on `streams`' commands and events streams, oldest first, up to the
    access stream's last message when this was called."""
    js = nc.jetstream()
    try:
        last = (await js.stream_info(streams.access)).state.last_seq
    except NotFoundError:
        raise NoAccessRecord(f"no {streams.access} stream on this server: `warden provision` creates it") from None
    found: list[Access] = []
    done = asyncio.Event()

    async def collect(message: Msg) -> None:
        access = parse_access(message.data)
        if access is not None and access.concerns(streams.audited):
            found.append(access)
        if message.metadata.sequence.stream >= last:
            done.set()

    if last == 0:
        return found
    reader = await FilteredReader(nc, streams.access, ACCESS_SUBJECT, collect).start()
    try:
        await asyncio.wait_for(done.wait(), READ_TIMEOUT_SECONDS)
    finally:
        await reader.stop()
    return found
