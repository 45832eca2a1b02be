"""Reading a range of a stream for a replay: a bare NATS connection that pulls and parses in bulk.

nats-py's subscription machinery costs more per message than projecting it, so a replay reads
through its own connection: it subscribes to an inbox, asks an ephemeral, unacknowledged pull
consumer for batches, and parses the protocol's frames itself. nats-py (the caller's client)
creates and deletes the consumer; servers the bare connection cannot talk to (TLS) are read
through nats-py instead (`read_range` chooses). Measured by W4 (`python -m bench.replay`, one
million events, two workers; bench/results/replay.json): the whole replay ran at 55,460 events/s
through this reader and at 21,474 through nats-py alone (2.58 times slower), so without it a
replay stays far below the 50,000 events/s it is held to.

What is in flight is bounded in bytes as well as in messages: each pull request asks for at
most `REQUEST_BYTES` (the server ends it early, with a 409 status, rather than exceed that), and
new requests are sent only while what has arrived and not been taken, plus what is still asked
for, stays within `WINDOW_BYTES`. Each request has an inbox (a subscription) of its own, dropped
once the request is served, so every message and status counts against the request it answers:
the server does not order one request's closing status before the next request's messages, and
a request may send a closing status after its last message. A stream of 1 MiB
messages is then read as steadily as one of small ones, and the server never holds more for this
connection than a slow reader can take.
"""

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import ParseResult

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from warden.audit_projector.projection import StoredMessage
from warden.identity import nkey_connect_fields
from warden.permissions import inbox_prefix
from warden.wire import MSG_ID_HEADER

log = structlog.get_logger(__name__)

# Messages per pull request, how many requests may be in flight at once, and how many messages
# may be asked for and not yet taken.
PULL_BATCH = 5_000
PULL_REQUESTS = 3
PULL_WINDOW = PULL_REQUESTS * PULL_BATCH
# Bytes per pull request (at least twice the largest message the server accepts), and how many
# bytes may be asked for or waiting at once.
REQUEST_BYTES = 8 * 1024 * 1024
WINDOW_BYTES = 4 * REQUEST_BYTES
# A pull that brings nothing for this long means the server stopped answering.
READ_TIMEOUT_SECONDS = 30.0


def stored_message(message: Msg) -> StoredMessage:
    """A message as nats-py delivered it from a stream, as the projector stores it."""
    metadata = message.metadata
    return StoredMessage(
        stream=metadata.stream,
        seq=metadata.sequence.stream,
        subject=message.subject,
        headers=message.headers,
        data=message.data,
        stored_at=metadata.timestamp,
    )


class RawReaderUnsupported(RuntimeError):
    """The server needs something the bare connection does not speak (TLS); use nats-py instead."""


# --- Headers ----------------------------------------------------------------------------------

# A header block in the plain form every Warden publisher writes: printable ASCII `Name: value`
# lines, where only the headers asked for need reading.
_PLAIN_HEADERS = re.compile(rb"NATS/1\.0\r\n(?:[!-9;-~]+:[ -~]*\r\n)+\r\n")
_STATUS_LINE_END = b"\r\n"


def header_lines(block: bytes) -> dict[str, str]:
    """The `Name: value` lines of a header block (after its `NATS/1.0` line), as nats-py delivers them.

    Lines without a colon, and names that are not ASCII or hold white space, are skipped; names
    and values are trimmed; values are UTF-8 with undecodable bytes replaced; the last line with
    a name wins.
    """
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if any(character.isspace() for character in key):
            continue
        headers[key] = value.strip().decode("utf-8", "replace")
    return headers


class WireHeaders(Mapping[str, str]):
    """A message's headers, read from its plain header block only as far as they are asked for.

    The projector asks each message for two headers; parsing all of them into a dict costs more
    than the rest of reading the message. In a plain block (see `_PLAIN_HEADERS`) a name can only
    appear right after a line break and before a colon, and the last line with that name wins.
    """

    __slots__ = ("_block", "_parsed")

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._parsed: dict[str, str] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        needle = _NEEDLES.get(key) or b"\r\n%s:" % key.encode()
        found = self._block.rfind(needle)
        if found < 0:
            return default
        start = found + len(needle)
        return self._block[start : self._block.index(b"\r\n", start)].strip().decode()

    def __getitem__(self, key: str) -> str:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return str(value)

    def __bool__(self) -> bool:
        return True  # a plain block has at least one header

    def _all(self) -> dict[str, str]:
        if self._parsed is None:
            self._parsed = header_lines(self._block)
        return self._parsed

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_MISSING = object()
_NEEDLES = {name: b"\r\n%s:" % name.encode() for name in (MSG_ID_HEADER, "traceparent")}


def parse_headers(block: bytes) -> Mapping[str, str] | None:
    """The headers of a message, as nats-py reports them (a mapping, or None when there are none)."""
    if _PLAIN_HEADERS.fullmatch(block):
        return WireHeaders(block)
    # Anything else (no headers, a status line, other characters): every line, read carefully.
    return header_lines(block[block.find(_STATUS_LINE_END) + 2 :]) or None


# --- The protocol ------------------------------------------------------------------------------

# The usual frame: HMSG <subject> <sid> $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.
# <consumer seq>.<timestamp ns>.<pending> <header bytes> <total bytes>. One match reads it all.
_STREAM_MESSAGE = re.compile(
    rb"HMSG ([^ \r\n]+) ([0-9]+) \$JS\.ACK\.[^. ]+\.[^. ]+\.[0-9]+\."
    rb"([0-9]+)\.[0-9]+\.([0-9]+)\.([0-9]+) ([0-9]+) ([0-9]+)\r\n"
)
# Statuses that close a pull request: it stopped short because the next message would pass its
# bytes, or (a request with max_bytes) it delivered its whole batch.
_REQUEST_CLOSED = (b"NATS/1.0 409 Message Size Exceeds MaxBytes", b"NATS/1.0 409 Batch Completed")


class _PullProtocol(asyncio.Protocol):
    """Parses what the server sends: stream messages are batched up for `PullReader`, the rest handled.

    It also keeps the books on the pull requests being served (`outstanding`: for each request's
    inbox, by its subscription id, how many messages it may still bring) and on what has arrived
    and not been taken (`waiting_bytes`, `waiting_messages`).
    """

    def __init__(self, stream: str, last_seq: int) -> None:
        self.stream = stream
        self.last_seq = last_seq
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The server's INFO, which opens every connection (its nonce is what an NKey signs).
        self.greeted: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.server_info: dict[str, Any] = {}
        self.batches: asyncio.Queue[list[StoredMessage] | BaseException | None] = asyncio.Queue()
        self.finished = False  # the last message of the range has arrived (or the connection failed)
        self.outstanding: dict[bytes, int] = {}
        self.delivered = 0
        self.waiting_bytes = 0
        self.waiting_messages = 0
        # Called whenever requests may have ended, so the reader can ask for more even while
        # nothing is being taken (it waits for a batch that only a new request can bring).
        self.on_progress: Callable[[], None] = lambda: None
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0  # bytes that must have arrived before the buffer is worth parsing again

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self._fail(exc or ConnectionError("NATS closed the connection during a replay"))

    def _fail(self, exc: BaseException) -> None:
        self.finished = True
        for future in (self.ready, self.greeted):
            if not future.done():
                future.set_exception(exc)
        self.batches.put_nowait(exc)

    def _served(self, sid: bytes) -> None:
        self.delivered += 1
        remaining = self.outstanding.get(sid)
        if remaining is not None:
            if remaining > 1:
                self.outstanding[sid] = remaining - 1
            else:
                self._close_request(sid)

    def _close_request(self, sid: bytes) -> None:
        """Forget a served request and drop its inbox, so a status it sends late reaches no one."""
        del self.outstanding[sid]
        assert self.transport is not None
        self.transport.write(b"UNSUB %s\r\n" % sid)

    def data_received(self, data: bytes) -> None:
        # A large message arrives in many pieces: keep them aside until the frame is complete,
        # rather than joining and re-scanning a growing buffer at every piece.
        self._chunks.append(data)
        self._have += len(data)
        if self._have < self._need:
            return
        buffer = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        pos = self._parse(buffer)
        rest = buffer[pos:]
        self._chunks = [rest] if rest else []
        self._have = len(rest)

    def _parse(self, buffer: bytes) -> int:
        """Handle every complete frame in `buffer`; return where the first incomplete one starts."""
        size, pos = len(buffer), 0
        stream, last_seq = self.stream, self.last_seq
        messages: list[StoredMessage] = []
        complete = False
        self._need = 0
        while not complete and not self.finished:
            match = _STREAM_MESSAGE.match(buffer, pos)
            if match is None:  # anything but a stream message in the usual form
                frame = self._other_frame(buffer, pos)
                if frame is None:
                    break  # the frame has not all arrived yet
                pos, message, complete = frame
                if message is not None:
                    messages.append(message)
                continue
            subject, sid, seq, stamp, pending, header_size, total_size = match.groups()
            start = match.end()
            stop = start + int(total_size)
            if stop + 2 > size:
                self._need = stop + 2 - pos  # the payload has not all arrived yet
                break
            self._served(sid)
            header_end = start + int(header_size)
            sequence = int(seq)
            if sequence <= last_seq:
                messages.append(
                    StoredMessage(
                        stream,
                        sequence,
                        subject.decode(),
                        parse_headers(buffer[start:header_end]),
                        buffer[header_end:stop],
                        # nats-py's arithmetic (Msg.Metadata), so stored_at is the same to the microsecond.
                        datetime.fromtimestamp(int(stamp) / 1_000_000_000.0, UTC),
                    )
                )
            # Past the range's end, or nothing more stored: done (what follows is never parsed).
            complete = sequence >= last_seq or pending == b"0"
            pos = stop + 2
        if messages:
            self.waiting_messages += len(messages)
            self.waiting_bytes += sum(len(message.data) for message in messages)
            self.batches.put_nowait(messages)
        if complete:
            self.finished = True
            self.batches.put_nowait(None)
        elif not self.finished:
            self.on_progress()
        return pos

    def _other_frame(self, buffer: bytes, pos: int) -> tuple[int, StoredMessage | None, bool] | None:
        """Handle one frame at `pos` that is not a usual stream message: (next pos, message, done), or None."""
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            self._need = len(buffer) - pos + 1
            return None
        if not (buffer.startswith(b"HMSG ", pos) or buffer.startswith(b"MSG ", pos)):
            line = buffer[pos:end]
            if line == b"PING":
                assert self.transport is not None
                self.transport.write(b"PONG\r\n")
            elif line == b"PONG":
                if not self.ready.done():
                    self.ready.set_result(None)
            elif line.startswith(b"INFO "):
                self.server_info = json.loads(line[5:])
                if self.server_info.get("tls_required"):
                    self._fail(RawReaderUnsupported("the NATS server requires TLS"))
                elif not self.greeted.done():
                    self.greeted.set_result(self.server_info)
            elif line.startswith(b"-ERR"):
                self._fail(ConnectionError(f"NATS refused the replay's reader: {line.decode(errors='replace')}"))
            return end + 2, None, False
        # HMSG <subject> <sid> [reply] <header bytes> <total bytes>, or MSG <subject> <sid> [reply] <bytes>
        headed = buffer[pos] == 72  # "H"
        args = buffer[pos + (5 if headed else 4) : end].split(b" ")
        start = end + 2
        stop = start + int(args[-1])
        if stop + 2 > len(buffer):
            self._need = stop + 2 - pos
            return None
        header_end = start + int(args[-2]) if headed else start
        reply = args[2] if len(args) == (5 if headed else 4) else b""
        if not reply.startswith(b"$JS.ACK."):
            self._status(args[1], buffer[start:header_end])
            return stop + 2, None, False
        self._served(args[1])
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>, or
        # with <domain>.<account hash> after ACK and a random token at the end.
        tokens = reply.split(b".")
        seq, stamp, pending = (tokens[5], tokens[7], tokens[8]) if len(tokens) == 9 else tokens[7:10]
        sequence = int(seq)
        message = None
        if sequence <= self.last_seq:
            message = StoredMessage(
                self.stream,
                sequence,
                args[0].decode(),
                parse_headers(buffer[start:header_end]) if headed else None,
                buffer[header_end:stop],
                datetime.fromtimestamp(int(stamp) / 1_000_000_000.0, UTC),
            )
        return stop + 2, message, sequence >= self.last_seq or pending == b"0"

    def _status(self, sid: bytes, block: bytes) -> None:
        if sid not in self.outstanding:
            return  # about a request already served
        if block.startswith(_REQUEST_CLOSED):
            self._close_request(sid)
            return
        # Anything else ends a pull early only when something is wrong (the consumer went away,
        # the server is shutting down): requests without an expiry never time out, and a
        # 100 (heartbeat) is not asked for.
        if not block.startswith(b"NATS/1.0 100"):
            self._fail(RuntimeError(f"JetStream ended a replay pull: {block.decode(errors='replace').strip()}"))


class PullReader:
    """Every message of `stream` from `first_seq` to `last_seq`, in order, as lists of StoredMessage.

    An ephemeral pull consumer with no acknowledgements, read over a bare NATS connection:
    consuming the stream does not disturb it or any other consumer. Sequences missing from the
    range (deleted messages) are simply not delivered; the caller sees the holes.
    """

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        filter_subject: str,
        first_seq: int,
        last_seq: int,
        *,
        seed_file: Path | None = None,
    ) -> None:
        self.seed_file = seed_file
        self.nc = nc
        self.stream = stream
        self.filter_subject = filter_subject
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.consumer = f"replay_{uuid.uuid4().hex}"
        self._protocol: _PullProtocol | None = None
        self._request_bytes = REQUEST_BYTES
        self._requests = 0

    async def __aenter__(self) -> Self:
        url = self.nc.connected_url
        if url is None or url.scheme not in ("nats", ""):
            raise RawReaderUnsupported(f"the bare reader speaks plain nats://, not {url and url.scheme}")
        await self.nc.jetstream().add_consumer(
            self.stream,
            ConsumerConfig(
                name=self.consumer,
                filter_subject=self.filter_subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.first_seq,
                # Unacknowledged and in memory: reading leaves no trace in the stream.
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                inactive_threshold=60.0,
            ),
        )
        try:
            await self._connect(url)
        except BaseException:
            await self._delete_consumer()
            raise
        return self

    async def _connect(self, url: ParseResult) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _PullProtocol(self.stream, self.last_seq), url.hostname or "127.0.0.1", url.port or 4222
        )
        self._protocol = protocol
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python3",
            "version": "warden-replay",
            "name": "warden-audit-replay",
        }
        inbox = "_INBOX"
        if self.seed_file is not None:
            # NKey authentication as nats-py does it: sign the nonce the server's INFO carries.
            info = await asyncio.wait_for(protocol.greeted, READ_TIMEOUT_SECONDS)
            fields = nkey_connect_fields(self.seed_file, info["nonce"])
            options.update(fields)
            inbox = inbox_prefix(fields["nkey"])
        elif url.username and url.password:
            options.update(user=url.username, **{"pass": url.password})
        elif url.username:
            options["auth_token"] = url.username
        self._inbox_stem = f"{inbox}.{uuid.uuid4().hex}".encode()
        self._write(b"CONNECT %s\r\nPING\r\n" % json.dumps(options).encode())
        await asyncio.wait_for(protocol.ready, READ_TIMEOUT_SECONDS)
        # A request must be able to hold the largest message the server accepts, or it would
        # end (409) before delivering it, again and again.
        self._request_bytes = max(REQUEST_BYTES, 2 * int(protocol.server_info.get("max_payload", 0)))
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}".encode()
        protocol.on_progress = self._top_up
        self._top_up()

    def _write(self, data: bytes) -> None:
        assert self._protocol is not None
        assert self._protocol.transport is not None
        self._protocol.transport.write(data)

    def _top_up(self) -> None:
        """Ask for more while what is waiting and what is asked for stays within both windows.

        The consumer does not stop at `last_seq`, so requests are sized to what is left of the
        range; only if all are served and the range is still open (deleted messages left holes)
        is more asked for.
        """
        protocol = self._protocol
        assert protocol is not None
        size = self.last_seq - self.first_seq + 1
        window_bytes = max(WINDOW_BYTES, 2 * self._request_bytes)
        while len(protocol.outstanding) < PULL_REQUESTS:
            asked = sum(protocol.outstanding.values())
            if protocol.waiting_bytes + (len(protocol.outstanding) + 1) * self._request_bytes > window_bytes:
                return
            if protocol.waiting_messages + asked >= PULL_WINDOW:
                return
            batch = min(PULL_BATCH, size - protocol.delivered - asked)
            if batch <= 0:
                if protocol.outstanding:
                    return
                batch = PULL_BATCH
            self._requests += 1
            sid = b"%d" % self._requests
            inbox = b"%s.%s" % (self._inbox_stem, sid)
            # No expiry: a request waits until served, and only stored messages are asked for.
            body = b'{"batch":%d,"max_bytes":%d}' % (batch, self._request_bytes)
            self._write(
                b"SUB %s %s\r\nPUB %s %s %d\r\n%s\r\n" % (inbox, sid, self._next_subject, inbox, len(body), body)
            )
            protocol.outstanding[sid] = batch

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[StoredMessage]:
        assert self._protocol is not None
        batch = await asyncio.wait_for(self._protocol.batches.get(), READ_TIMEOUT_SECONDS)
        if batch is None:
            raise StopAsyncIteration
        if isinstance(batch, BaseException):
            raise batch
        self._protocol.waiting_messages -= len(batch)
        self._protocol.waiting_bytes -= sum(len(message.data) for message in batch)
        if not self._protocol.finished:
            self._top_up()
        return batch

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.finished = True
            self._protocol.transport.close()
        await self._delete_consumer()

    async def _delete_consumer(self) -> None:
        with contextlib.suppress(Exception):  # it expires on its own after inactive_threshold
            await self.nc.jetstream().delete_consumer(self.stream, self.consumer)


async def _nats_py_batches(
    nc: NatsClient, stream: str, filter_subject: str, first_seq: int, last_seq: int
) -> AsyncIterator[list[StoredMessage]]:
    """The portable, slower reader (nats-py batched fetch), for servers the bare reader cannot talk to.

    nats-py cannot bound a fetch in bytes, so each asks for as many messages as fit in the
    window if every one were as large as the server allows.
    """
    batch = max(1, min(PULL_BATCH, WINDOW_BYTES // max(nc.max_payload, 1)))
    subscription = await nc.jetstream().pull_subscribe(
        filter_subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    try:
        seen = first_seq - 1
        while seen < last_seq:
            messages = await subscription.fetch(batch, timeout=READ_TIMEOUT_SECONDS)
            yield [stored_message(m) for m in messages if m.metadata.sequence.stream <= last_seq]
            seen = messages[-1].metadata.sequence.stream
            if messages[-1].metadata.num_pending == 0:
                break
    finally:
        await subscription.unsubscribe()


async def first_stored(nc: NatsClient, stream: str, filter_subject: str, first_seq: int) -> int | None:
    """The sequence of the first message at or after `first_seq`, or None if there is none."""
    try:
        found = await nc.jetstream().get_msg(stream, first_seq, subject=filter_subject, next=True)
    except NotFoundError:
        return None
    return found.seq


async def read_range(
    nc: NatsClient,
    stream: str,
    filter_subject: str,
    first_seq: int,
    last_seq: int,
    *,
    bare: bool = True,
    seed_file: Path | None = None,
) -> AsyncIterator[list[StoredMessage]]:
    """Messages `first_seq`..`last_seq` of a stream, in order, in lists: bare reader if possible
    (and `bare`), else nats-py.

    A range with no message left in it (every one deleted) yields nothing, at once: a consumer
    would wait for a message that never comes.
    """
    start = await first_stored(nc, stream, filter_subject, first_seq)
    if start is None or start > last_seq:
        return
    try:
        if not bare:
            raise RawReaderUnsupported("asked to read through nats-py")
        reader = PullReader(nc, stream, filter_subject, start, last_seq, seed_file=seed_file)
        async with reader:
            async for batch in reader:
                yield batch
        return
    except RawReaderUnsupported as exc:
        log.info("replay reads through nats-py", reason=str(exc))
    async for batch in _nats_py_batches(nc, stream, filter_subject, start, last_seq):
        yield batch
