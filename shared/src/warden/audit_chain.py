"""The audit log's hash chains, signed checkpoints over them, and the check of a chain row by row.

Every `events` row belongs to one chain: that of its stream and tenant, so a tenant's evidence can
be checked (and later exported) alone and no single writer has to see every tenant. A row's
`chain_hash` is `link(previous row's chain_hash, content_hash(row))`, its `chain_index` its place
(1, 2, ...) in the chain, in stream order. A checkpoint is a signature over a chain's index and head
at one moment; since every head is computed through every earlier one, a checkpoint vouches for
all the rows before it, and for every earlier checkpoint of its chain.

Nothing here touches a database or a server, so an offline verifier can use it as it is.
"""

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pydantic_core
from typing_extensions import TypedDict  # pydantic describes typing's own only from Python 3.12

# The columns of an `events` row that its content hash covers, in this order: every column but
# the chain's own. warden.audit_projector.projection checks its rows lead with these.
CONTENT_COLUMNS = (
    "stream",
    "stream_seq",
    "nats_subject",
    "stored_at",
    "tenant",
    "event_id",
    "type",
    "source",
    "entity_id",
    "time",
    "actor",
    "correlation_id",
    "causation_id",
    "trace_id",
    "schema_version",
    "idempotency_key",
    "payload",
    "raw",
    "invalid_reason",
)
_STORED_AT, _TIME, _PAYLOAD, _RAW = (CONTENT_COLUMNS.index(name) for name in ("stored_at", "time", "payload", "raw"))
_CONTENT_LENGTH = len(CONTENT_COLUMNS)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_CONTENT_PREFIX = b"warden-event-v1\n"
_GENESIS_PREFIX = b"warden-chain-v1\n"
_CHECKPOINT_PREFIX = b"warden-checkpoint-v1\n"

ChainId = tuple[str, str]  # (stream, tenant)


def _micros(value: datetime | None) -> int | None:
    """An instant as microseconds since 1970 (Postgres keeps microseconds; a naive time is read as UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


# Valid payloads hold no integer beyond 2**53 (warden.decoding refuses them), so such a number read
# back is a float that Postgres's jsonb spelt out: the projector writes 1e16 as "1e+16", jsonb gives
# "10000000000000000". jsonb also drops the sign of -0.0. Read this way, both spellings are one value.
_LARGEST_EXACT = 2**53


def _integer(text: str) -> int | float:
    value = int(text)
    return float(text) if abs(value) > _LARGEST_EXACT else value


def _float(text: str) -> float:
    return float(text) + 0.0  # -0.0 + 0.0 is 0.0


# Built once: json.loads and json.dumps with options build a decoder or encoder on every call.
_PAYLOAD_DECODER = json.JSONDecoder(parse_int=_integer, parse_float=_float)
_PAYLOAD_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
# What only the careful reading above can settle: 16 digits in a row (a large integer, or a float
# spelt out), or a negative zero. Anything else reads the same through pydantic-core's faster parser.
_NEEDS_CARE = re.compile(r"\d{16}|-0\.0")


def canonical_json(value: Any) -> str:
    """A JSON value as canonical JSON text (keys sorted, ASCII): what the projector stores as a payload,
    so that hashing it needs no second pass (see `content_bytes`)."""
    return _PAYLOAD_ENCODER.encode(value)


def canonical_payload(text: str | None) -> str | None:
    """A jsonb payload as canonical JSON (keys sorted, numbers by value, ASCII), whether it is read
    from the projector's JSON or from Postgres's."""
    if text is None:
        return None
    quick = _PAYLOAD_ENCODER.encode(pydantic_core.from_json(text))
    if _NEEDS_CARE.search(quick) is None:
        return quick
    return _PAYLOAD_ENCODER.encode(_PAYLOAD_DECODER.decode(text))


def content_bytes(row: Sequence[Any], *, canonical_text: bool = False) -> bytes:
    """The canonical bytes of an events row's content: its CONTENT_COLUMNS, leading `row`, as a JSON array.

    Times become microseconds, the payload its canonical JSON text, raw bytes base64. This runs once
    per row written (a replay's hot loop), so the array is serialised by pydantic-core, and a payload
    the writer made with `canonical_json` (`canonical_text`) is taken as it is: reading it again
    could only turn a negative zero into zero.
    """
    return encode_content(canonical_content(row, canonical_text=canonical_text))


def canonical_content(row: Sequence[Any], *, canonical_text: bool = False) -> list[Any]:
    """The values `content_bytes` encodes: the row's CONTENT_COLUMNS, times as microseconds, the
    payload as canonical JSON text, raw bytes as base64 (what an evidence bundle shows of a row)."""
    values = list(row[:_CONTENT_LENGTH])
    values[_STORED_AT] = _micros(values[_STORED_AT])
    values[_TIME] = _micros(values[_TIME])
    payload = values[_PAYLOAD]
    if not canonical_text or (payload is not None and "-0.0" in payload):
        values[_PAYLOAD] = canonical_payload(payload)
    raw = values[_RAW]
    values[_RAW] = base64.b64encode(raw).decode() if raw is not None else None
    return values


def encode_content(values: Sequence[Any]) -> bytes:
    """The bytes a row's content hash is taken over, from its `canonical_content`."""
    return _CONTENT_PREFIX + pydantic_core.to_json(list(values))


def content_hash(row: Sequence[Any]) -> bytes:
    """SHA-256 of `content_bytes(row)`."""
    return hashlib.sha256(content_bytes(row)).digest()


def genesis(chain: ChainId) -> bytes:
    """The hash a chain starts from: its own, so no row can be moved from one chain to another unnoticed."""
    return hashlib.sha256(_GENESIS_PREFIX + json.dumps(list(chain)).encode()).digest()


def link(previous_hash: bytes, row_content_hash: bytes) -> bytes:
    """A row's chain hash: SHA-256 over the previous row's chain hash and the row's content hash."""
    return hashlib.sha256(previous_hash + row_content_hash).digest()


class Head(NamedTuple):
    """Where a chain ends: the index of its last row (0 for none yet) and that row's chain hash.

    A named tuple, not a frozen dataclass: one is made per row written, and a frozen dataclass's
    __init__ costs several times as much.
    """

    last_index: int
    hash: bytes


_new_head = tuple.__new__


class ChainHeads:
    """The head of every chain, as a writer extends them in stream order.

    `fork()` gives a copy to extend while a write is in flight; `adopt()` takes its heads back once
    the write has committed, so a write that fails leaves the heads where the table is.
    """

    def __init__(self, heads: dict[ChainId, Head] | None = None) -> None:
        self.heads: dict[ChainId, Head] = dict(heads or {})

    def head(self, chain: ChainId) -> Head:
        head = self.heads.get(chain)
        return head if head is not None else Head(0, genesis(chain))

    def append(self, chain: ChainId, row_content_hash: bytes) -> Head:
        """Extend `chain` by a row with this content hash; return the row's index and chain hash."""
        head = self.head(chain)
        new = self.heads[chain] = Head(head.last_index + 1, link(head.hash, row_content_hash))
        return new

    def chained(self, rows: Iterable[Sequence[Any]], *, canonical_text: bool = False) -> list[tuple[Any, ...]]:
        """Rows whose CONTENT_COLUMNS lead, each with its chain index and chain hash after them, in order.

        `rows` lead with their stream (column 0) and tenant (column 4); `canonical_text`: their
        payloads were written with `canonical_json` (see `content_bytes`).
        """
        out = []
        heads = self.heads
        sha256 = hashlib.sha256
        for row in rows:
            content = row[:_CONTENT_LENGTH]
            chain = (row[0], row[4])
            head = heads.get(chain)
            if head is None:
                head = Head(0, genesis(chain))
            index = head[0] + 1
            content_digest = sha256(content_bytes(content, canonical_text=canonical_text)).digest()
            digest = sha256(head[1] + content_digest).digest()  # link(), inlined
            heads[chain] = _new_head(Head, (index, digest))
            out.append((*content, index, digest))
        return out

    def fork(self) -> "ChainHeads":
        return ChainHeads(self.heads)

    def adopt(self, other: "ChainHeads") -> None:
        self.heads = other.heads

    def for_stream(self, stream: str) -> dict[str, Head]:
        return {tenant: head for (name, tenant), head in self.heads.items() if name == stream}


class CheckpointDocument(TypedDict):
    """A signed checkpoint as its stream holds it: chain (stream, tenant) had `index` rows ending in
    `head` (hex) at `time` (ISO 8601), signed with Ed25519 by `signing_key` (base64 public key)."""

    stream: str
    tenant: str
    index: int
    head: str
    time: str
    signing_key: str
    signature: str


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that chain (stream, tenant) had `index` rows ending in `head` at `time`."""

    stream: str
    tenant: str
    index: int
    head: bytes
    time: datetime
    signing_key: str = ""  # base64 Ed25519 public key
    signature: str = ""  # base64

    @property
    def chain(self) -> ChainId:
        return (self.stream, self.tenant)

    def signed_bytes(self) -> bytes:
        """What is signed: the fields as canonical JSON, prefixed so it is never mistaken for another signature."""
        fields = {
            "stream": self.stream,
            "tenant": self.tenant,
            "index": self.index,
            "head": self.head.hex(),
            "time": self.time.astimezone(UTC).isoformat(),
        }
        return _CHECKPOINT_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        document = CheckpointDocument(
            stream=self.stream,
            tenant=self.tenant,
            index=self.index,
            head=self.head.hex(),
            time=self.time.astimezone(UTC).isoformat(),
            signing_key=self.signing_key,
            signature=self.signature,
        )
        return json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Checkpoint":
        """Parse a stored checkpoint; ValueError (or KeyError, TypeError) when it is not one."""
        document = json.loads(data)
        return cls(
            stream=str(document["stream"]),
            tenant=str(document["tenant"]),
            index=int(document["index"]),
            head=bytes.fromhex(document["head"]),
            time=datetime.fromisoformat(document["time"]),
            signing_key=str(document["signing_key"]),
            signature=str(document["signature"]),
        )


# What the verifier can find, each with the chain and where.


@dataclass(frozen=True)
class Finding:
    """Something in the audit that is not as the chain, the checkpoints or the streams say it was."""

    stream: str
    tenant: str

    kind = "finding"

    def describe(self) -> str:
        raise NotImplementedError

    def as_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {"kind": self.kind, **values, "description": self.describe()}


@dataclass(frozen=True)
class ChangedRow(Finding):
    stream_seq: int
    chain_index: int
    kind = "changed_row"

    def describe(self) -> str:
        return f"row {self.stream_seq} (chain index {self.chain_index}) does not match its chain hash: changed"


@dataclass(frozen=True)
class MissingRows(Finding):
    first_index: int
    last_index: int
    before_seq: int | None  # the row found where they should have been
    kind = "missing_rows"

    def describe(self) -> str:
        where = f" before row {self.before_seq}" if self.before_seq is not None else ""
        return f"chain indexes {self.first_index}..{self.last_index} missing{where}: rows deleted"


@dataclass(frozen=True)
class InsertedRow(Finding):
    stream_seq: int
    reason: str
    kind = "inserted_row"

    def describe(self) -> str:
        return f"row {self.stream_seq} was not written by the projector: {self.reason}"


@dataclass(frozen=True)
class ReorderedRow(Finding):
    stream_seq: int
    chain_index: int
    after_index: int
    kind = "reordered_row"

    def describe(self) -> str:
        return (
            f"row {self.stream_seq} (chain index {self.chain_index}) comes after chain index {self.after_index}: "
            "rows swapped or moved"
        )


@dataclass(frozen=True)
class RowsCutOff(Finding):
    last_index: int  # the chain's last row in the table
    through_index: int  # the last index known to have existed
    evidence: str  # "checkpoint" or "stream"
    kind = "rows_cut_off"

    def describe(self) -> str:
        return (
            f"chain ends at index {self.last_index} but the {self.evidence} shows rows up to "
            f"{self.through_index}: its last rows were cut off"
        )


@dataclass(frozen=True)
class CheckpointMismatch(Finding):
    chain_index: int
    kind = "checkpoint_mismatch"

    def describe(self) -> str:
        return f"the chain's hash at index {self.chain_index} is not the one its checkpoint signed: rewritten"


@dataclass(frozen=True)
class BadCheckpoint(Finding):
    chain_index: int
    reason: str
    kind = "bad_checkpoint"

    def describe(self) -> str:
        return f"checkpoint at index {self.chain_index} refused: {self.reason}"


@dataclass(frozen=True)
class StreamMismatch(Finding):
    stream_seq: int
    reason: str
    kind = "stream_mismatch"

    def describe(self) -> str:
        return f"row {self.stream_seq} and the stream disagree: {self.reason}"


@dataclass(frozen=True)
class ChainRow:
    """What the verifier needs of one events row: where it is, what it claims, what its content hashes to."""

    stream: str
    stream_seq: int
    tenant: str
    chain_index: int | None
    chain_hash: bytes | None
    content_hash: bytes

    @property
    def chain(self) -> ChainId:
        return (self.stream, self.tenant)


@dataclass
class _ChainState:
    last_index: int = 0
    last_hash: bytes = b""
    rows: int = 0
    unchained: int = 0  # rows from before chaining, ahead of its first chained row
    absent: dict[int, int | None] = field(default_factory=dict)  # index -> the row found in its place
    hashes_at: dict[int, bytes] = field(default_factory=dict)  # the hash at each checkpointed index


@dataclass(frozen=True)
class ChainSummary:
    """One chain as the verifier saw it."""

    stream: str
    tenant: str
    rows: int
    last_index: int
    last_checkpoint: int  # 0: none
    unchained: int  # rows written before the table was chained

    @property
    def unanchored(self) -> int:
        """Rows after the last checkpoint: no signature vouches for them yet."""
        return max(0, self.last_index - self.last_checkpoint)


class ChainVerifier:
    """Checks rows, fed in stream order (any tenants interleaved), against their chains and checkpoints.

    A row whose index follows its predecessor's must link to it; a row further on means rows
    are missing, unless they turn up later (then they were reordered); a row without chain values,
    or repeating an index, was not written by the projector. Once every row is in, `finish()` holds
    the chains against the checkpoints: a checkpoint past a chain's end means its last rows were cut
    off, one whose head differs means the chain was rewritten before it.
    """

    def __init__(self, checkpoints: Iterable[Checkpoint] = (), anchors: Mapping[ChainId, Head] | None = None) -> None:
        """`anchors`: where chains whose rows start later than their first begin (an evidence bundle's
        chains start after a checkpoint): the index and hash before their first row."""
        self.findings: list[Finding] = []
        self.chains: dict[ChainId, _ChainState] = {}
        self.checkpoints: dict[ChainId, dict[int, Checkpoint]] = {}
        self.anchors = dict(anchors or {})
        for checkpoint in checkpoints:
            self.checkpoints.setdefault(checkpoint.chain, {})[checkpoint.index] = checkpoint

    def _start(self, chain: ChainId) -> _ChainState:
        anchor = self.anchors.get(chain)
        if anchor is None:
            return _ChainState(last_hash=genesis(chain))
        return _ChainState(
            last_index=anchor.last_index, last_hash=anchor.hash, hashes_at={anchor.last_index: anchor.hash}
        )

    def add(self, row: ChainRow) -> None:
        chain = row.chain
        state = self.chains.get(chain)
        if state is None:
            state = self.chains[chain] = self._start(chain)
        state.rows += 1
        if row.chain_index is None or row.chain_hash is None:
            if state.last_index == 0 and not state.absent:
                state.unchained += 1  # written before chaining began
            else:
                self._found(InsertedRow(*chain, row.stream_seq, "it has no chain values"))
            return
        expected = state.last_index + 1
        if row.chain_index == expected:
            if row.chain_hash != link(state.last_hash, row.content_hash):
                self._found(ChangedRow(*chain, row.stream_seq, row.chain_index))
        elif row.chain_index > expected:
            for index in range(expected, row.chain_index):
                state.absent[index] = row.stream_seq
        else:
            if row.chain_index in state.absent:
                del state.absent[row.chain_index]
                self._found(ReorderedRow(*chain, row.stream_seq, row.chain_index, state.last_index))
            else:
                self._found(InsertedRow(*chain, row.stream_seq, f"it repeats chain index {row.chain_index}"))
            return
        # Later rows are checked against what this row says its hash is: one changed row is one finding.
        state.last_index, state.last_hash = row.chain_index, row.chain_hash
        if row.chain_index in self.checkpoints.get(chain, ()):
            state.hashes_at[row.chain_index] = row.chain_hash

    def _found(self, finding: Finding) -> None:
        self.findings.append(finding)

    def finish(self) -> list[ChainSummary]:
        """Report what is still missing and hold each chain against its checkpoints; return the chains."""
        for chain, state in self.chains.items():
            for first, last, before in _runs(state.absent):
                self._found(MissingRows(*chain, first, last, before))
        summaries = []
        for chain in sorted(set(self.chains) | set(self.checkpoints)):
            state = self.chains.get(chain) or self._start(chain)
            checkpoints = self.checkpoints.get(chain, {})
            last_checkpoint = 0
            begins = self.anchors[chain].last_index if chain in self.anchors else 0
            for index, checkpoint in sorted(checkpoints.items()):
                if index < begins:
                    continue  # before the rows at hand: vouched for by the anchor, not checked here
                if index > state.last_index:
                    self._found(RowsCutOff(*chain, state.last_index, max(checkpoints), "checkpoint"))
                    break
                last_checkpoint = index
                if state.hashes_at.get(index) != checkpoint.head:
                    self._found(CheckpointMismatch(*chain, index))
            summaries.append(ChainSummary(*chain, state.rows, state.last_index, last_checkpoint, state.unchained))
        return summaries


def _runs(absent: dict[int, int | None]) -> Iterator[tuple[int, int, int | None]]:
    """Consecutive missing indexes as (first, last, the row found in their place)."""
    run: list[int] = []
    for index in sorted(absent):
        if run and (index != run[-1] + 1 or absent[index] != absent[run[0]]):
            yield run[0], run[-1], absent[run[0]]
            run = []
        run.append(index)
    if run:
        yield run[0], run[-1], absent[run[0]]
