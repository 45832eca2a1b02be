"""The audit hash chain: its pure code, and tampering with a real projection found by `warden audit verify`."""

import dataclasses
import hashlib
import json
from datetime import UTC, datetime

import asyncpg
import nacl.signing
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually, run_warden_cli, warden_cli
from tests.test_projector import publish, run_lifecycle
from warden.audit_chain import (
    CONTENT_COLUMNS,
    BadCheckpoint,
    ChainHeads,
    ChainRow,
    ChainVerifier,
    ChangedRow,
    Checkpoint,
    CheckpointMismatch,
    InsertedRow,
    MissingRows,
    ReorderedRow,
    RowsCutOff,
    canonical_json,
    canonical_payload,
    content_bytes,
    content_hash,
)
from warden.audit_projector.app import build_app
from warden.audit_projector.checkpoints import EXPECTED_LAST_SUBJECT_SEQUENCE
from warden.audit_projector.replay import replay
from warden.audit_projector.verify import VerifyReport, verify
from warden.cli import AUDIT_NOT_INTACT
from warden.identity import connect_options
from warden.permissions import Role
from warden.settings import Settings
from warden.signing import Signer, TrustedKeys
from warden.streams import StreamNames
from warden.subjects import Subjects
from warden.wire import connect

STORED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _row(seq: int, tenant: str = "acme", payload: str | None = '{"n": 1}', actor: str = "alice") -> tuple[object, ...]:
    return ("EVENTS", seq, f"w.evt.{tenant}.run.r.x", STORED, tenant, f"e{seq}", "run.queued", "sched", "r1",
            STORED, actor, "c", None, None, 1, None, payload, None, None)  # fmt: skip


def _chain_rows(rows: list[tuple[object, ...]]) -> list[ChainRow]:
    chained = ChainHeads().chained(rows)
    return [ChainRow(r[0], r[1], r[4], r[-2], r[-1], content_hash(r)) for r in chained]


def _verify(rows: list[ChainRow], checkpoints: list[Checkpoint] = ()) -> ChainVerifier:  # type: ignore[assignment]
    verifier = ChainVerifier(checkpoints)
    for row in rows:
        verifier.add(row)
    verifier.finish()
    return verifier


def test_payload_numbers_hash_alike_however_postgres_spells_them() -> None:
    """A payload read back from jsonb (integral floats spelt out, keys reordered, no negative zero) hashes
    as the projector's canonical JSON does."""
    value = {"b": 1e16, "a": [100000.0, 0.1, 1.5e-07, -0.0, 2**53, 1.2345678901234568e17], "c": "\u00e9"}
    written = canonical_json(value)
    from_postgres = (
        '{"a": [100000.0, 0.1, 0.00000015, 0.0, 9007199254740992, 123456789012345680], '
        '"b": 10000000000000000, "c": "\u00e9"}'
    )
    assert canonical_payload(written) == canonical_payload(from_postgres)
    assert (
        content_hash(_row(1, payload=from_postgres))
        == hashlib.sha256(content_bytes(_row(1, payload=written), canonical_text=True)).digest()
    )
    plain = canonical_json({"n": 1, "m": [1.5]})
    assert content_bytes(_row(1, payload=plain), canonical_text=True) == content_bytes(_row(1, payload=plain))
    assert content_hash(_row(1, payload='{"n": 1}')) != content_hash(_row(1, payload='{"n": 2}'))


def test_chains_are_per_stream_and_tenant() -> None:
    """Each (stream, tenant) chain counts from 1; interleaved tenants do not affect each other's hashes."""
    mixed = ChainHeads().chained([_row(1, "acme"), _row(2, "other"), _row(3, "acme")])
    alone = ChainHeads().chained([_row(1, "acme"), _row(3, "acme")])
    assert [row[-2] for row in mixed] == [1, 1, 2]
    assert mixed[2][-1] == alone[1][-1]


def test_an_intact_chain_verifies_clean() -> None:
    """Rows as the projector chained them give no finding."""
    assert _verify(_chain_rows([_row(seq) for seq in range(1, 8)])).findings == []


def test_each_tampering_is_told_apart() -> None:
    """A changed, deleted, inserted or moved row each gives its own kind of finding, and only that."""
    rows = _chain_rows([_row(seq) for seq in range(1, 10)])
    changed = list(rows)
    changed[3] = dataclasses.replace(rows[3], content_hash=content_hash(_row(4, actor="mallory")))
    assert [type(f) for f in _verify(changed).findings] == [ChangedRow]

    deleted = rows[:4] + rows[5:]
    assert [(type(f), f.first_index) for f in _verify(deleted).findings] == [(MissingRows, 5)]  # type: ignore[attr-defined]

    inserted = [*rows, ChainRow("EVENTS", 99, "acme", 3, rows[2].chain_hash, content_hash(_row(99)))]
    assert [type(f) for f in _verify(inserted).findings] == [InsertedRow]
    unchained = [*rows, ChainRow("EVENTS", 99, "acme", None, None, content_hash(_row(99)))]
    assert [type(f) for f in _verify(unchained).findings] == [InsertedRow]

    swapped = list(rows)
    swapped[3], swapped[4] = rows[4], rows[3]
    assert [type(f) for f in _verify(swapped).findings] == [ReorderedRow]


def _signed(signer: Signer, index: int, head: bytes) -> Checkpoint:
    unsigned = Checkpoint("EVENTS", "acme", index, head, STORED, signer.public_key)
    return Checkpoint(**{**vars(unsigned), "signature": signer.sign_bytes(unsigned.signed_bytes())})


def test_checkpoints_vouch_for_the_prefix_and_expose_a_cut_or_a_rewrite() -> None:
    """A checkpoint past the chain's end reports the cut-off rows; a head that differs reports a rewrite."""
    signer = Signer(nacl.signing.SigningKey.generate())
    rows = _chain_rows([_row(seq) for seq in range(1, 10)])
    checkpoint = _signed(signer, 6, rows[5].chain_hash)  # type: ignore[arg-type]
    assert _verify(rows, [checkpoint]).findings == []
    cut = _verify(rows[:4], [checkpoint]).findings
    assert [(type(f), f.last_index, f.through_index) for f in cut] == [(RowsCutOff, 4, 6)]  # type: ignore[attr-defined]
    # Rewritten consistently from row 3 on: every link holds, the checkpoint's head does not.
    rewritten = _chain_rows([_row(seq, actor="mallory" if seq == 3 else "alice") for seq in range(1, 10)])
    assert [type(f) for f in _verify(rewritten, [checkpoint]).findings] == [CheckpointMismatch]
    summary = ChainVerifier([checkpoint])
    for row in rows:
        summary.add(row)
    assert [chain.unanchored for chain in summary.finish()] == [3]


def test_a_forged_or_altered_checkpoint_is_refused() -> None:
    """Only the projector's key signs a checkpoint, over exactly its chain, index, head and time."""
    signer, forger = Signer(nacl.signing.SigningKey.generate()), Signer(nacl.signing.SigningKey.generate())
    trusted = TrustedKeys([signer.public_key])
    good = _signed(signer, 6, b"\x01" * 32)
    assert trusted.refusal_of(good.signed_bytes(), good.signing_key, good.signature) is None
    assert Checkpoint.from_json(good.to_json()) == good
    altered = Checkpoint(**{**vars(good), "index": 7})
    assert trusted.refusal_of(altered.signed_bytes(), altered.signing_key, altered.signature) is not None
    forged = _signed(forger, 6, b"\x01" * 32)
    assert trusted.refusal_of(forged.signed_bytes(), forged.signing_key, forged.signature) is not None
    assert BadCheckpoint("EVENTS", "acme", 6, "bad signature").kind == "bad_checkpoint"


@pytest.mark.parametrize("payload", [None, "null", '{"x": "\\u00e9\\ud83d\\ude00"}'])
def test_content_hash_is_stable_for_odd_payloads(payload: str | None) -> None:
    """Absent, null and non-ASCII payloads hash the same every time."""
    assert content_hash(_row(1, payload=payload)) == content_hash(_row(1, payload=payload))


# Against the real servers: a projected audit, tampered with as a database superuser would.

ACME_EVENTS_ANCHORED = 7  # acme's events chain: run r1's 7 events, signed by the first projector
ACME_EVENTS_TOTAL = 12  # and run r3's 5 events after them, which no checkpoint covers yet


async def projected_audit(settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner) -> str:
    """Two runs projected and fully checkpointed, then a third projected by a projector that signs
    nothing yet; return the events stream's name."""
    names = StreamNames.for_prefix(settings.subject_prefix)
    for envelope in [*run_lifecycle("acme", "r1", steps=4), *run_lifecycle("globex", "r2", steps=1)]:
        await publish(nc, settings, envelope)
    signing = settings.model_copy(update={"checkpoint_every_events": 3, "checkpoint_every_seconds": 0.1})
    first = build_app(signing)
    await run_app(first)
    await eventually(lambda: db.fetchval("SELECT count(*) = 13 FROM events"))

    async def anchored() -> bool:
        report = await verify(settings, db, skip_stream=True)
        return report.intact and report.checkpoints > 0 and report.unanchored == 0

    await eventually(anchored)
    first.exit()
    quiet = settings.model_copy(update={"checkpoint_every_events": 10**6, "checkpoint_every_seconds": 3600.0})
    await run_app(build_app(quiet))  # takes over once the first has let go
    for envelope in run_lifecycle("acme", "r3", steps=2):
        await publish(nc, settings, envelope)
    await eventually(lambda: db.fetchval("SELECT count(*) = 19 FROM events"))
    await db.execute("SET session_replication_role = replica")  # the superuser's way past the append-only triggers
    return names.events


async def seq_at(db: asyncpg.Connection, stream: str, index: int, tenant: str = "acme") -> int:
    seq = await db.fetchval(
        "SELECT stream_seq FROM events WHERE stream = $1 AND tenant = $2 AND chain_index = $3", stream, tenant, index
    )
    assert seq is not None
    return int(seq)


def kinds(report: VerifyReport, source: str | None = None) -> set[str]:
    return {finding.kind for finding in report.findings}


async def test_an_intact_audit_verifies_clean(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Untouched, every chain, checkpoint and stream message agrees: exit 0, the unsigned tail noted."""
    await projected_audit(settings, nc, db, run_app)
    report = await verify(settings, db)
    assert report.findings == []
    assert report.rows == report.messages == 19
    assert report.unanchored == ACME_EVENTS_TOTAL - ACME_EVENTS_ANCHORED + 1  # and r3's command
    result = await run_warden_cli(settings, "audit", "verify", "--quiet")
    assert result.status == 0, result.stderr
    assert result.stdout.startswith("intact: 19 rows"), result.stdout
    document = json.loads(await warden_cli(settings, "audit", "verify", "--json", "--quiet"))
    assert document["intact"] is True
    assert document["findings"] == []


# Each row moved to the other's place: by way of a free key, as the key is checked row by row.
SWAP = (
    "UPDATE events SET stream_seq = -1 WHERE stream = $1 AND stream_seq = $2",
    "UPDATE events SET stream_seq = $2 WHERE stream = $1 AND stream_seq = $3",
    "UPDATE events SET stream_seq = $2 WHERE stream = $1 AND stream_seq = -1",
)
TAMPERING: dict[str, tuple[str | tuple[str, ...], tuple[int, ...], set[str]]] = {
    "changed column": (
        "UPDATE events SET actor = 'mallory' WHERE stream = $1 AND stream_seq = $2",
        (3,),
        {"changed_row", "stream_mismatch"},
    ),
    "deleted row": ("DELETE FROM events WHERE stream = $1 AND stream_seq = $2", (3,), {"missing_rows"}),
    "inserted row": (
        "INSERT INTO events SELECT stream, 100000 + stream_seq, nats_subject, stored_at, tenant, event_id, type,"
        " source, entity_id, time, actor, correlation_id, causation_id, trace_id, schema_version, idempotency_key,"
        " payload, raw, invalid_reason, chain_index, chain_hash FROM events WHERE stream = $1 AND stream_seq = $2",
        (3,),
        {"inserted_row"},
    ),
    "two rows swapped": (SWAP, (3, 4), {"reordered_row", "stream_mismatch"}),
}


@pytest.mark.parametrize("case", list(TAMPERING))
async def test_each_tampering_is_found(
    case: str, settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A changed column, a deleted, an inserted row, two rows swapped: each found, as what it is, exit 6."""
    stream = await projected_audit(settings, nc, db, run_app)
    statement, indexes, expected = TAMPERING[case]
    seqs = [await seq_at(db, stream, index) for index in indexes]
    if isinstance(statement, str):
        await db.execute(statement, stream, *seqs)
    else:
        first, second = seqs
        for step, arguments in zip(statement, ((first,), (first, second), (second,)), strict=True):
            await db.execute(step, stream, *arguments)
    report = await verify(settings, db)
    assert kinds(report) == expected, [finding.describe() for finding in report.findings]
    chain_only = await verify(settings, db, skip_stream=True)
    assert kinds(chain_only) == expected - {"stream_mismatch"}
    result = await run_warden_cli(settings, "audit", "verify", "--quiet")
    assert result.status == AUDIT_NOT_INTACT, result.stdout + result.stderr
    assert "NOT INTACT" in result.stdout


async def test_rows_cut_off_are_reported_as_such(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A chain's unsigned tail cut off shows against the stream only; cut into signed rows, against the checkpoint."""
    stream = await projected_audit(settings, nc, db, run_app)
    await db.execute("DELETE FROM events WHERE stream = $1 AND tenant = 'acme' AND chain_index > 9", stream)
    report = await verify(settings, db)
    assert [(f.kind, f.evidence, f.last_index, f.through_index) for f in report.findings] == [  # type: ignore[attr-defined]
        ("rows_cut_off", "stream", 9, ACME_EVENTS_TOTAL)
    ]
    assert (await verify(settings, db, skip_stream=True)).findings == []  # unanchored: the chain alone cannot tell

    await db.execute("DELETE FROM events WHERE stream = $1 AND tenant = 'acme' AND chain_index > 5", stream)
    chain_only = await verify(settings, db, skip_stream=True)
    assert [(f.kind, f.evidence, f.last_index) for f in chain_only.findings] == [  # type: ignore[attr-defined]
        ("rows_cut_off", "checkpoint", 5)
    ]


async def test_a_row_rewritten_with_its_chain_differs_from_its_stream_message(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A row changed in the unsigned tail, the chain recomputed after it: only the stream shows it."""
    stream = await projected_audit(settings, nc, db, run_app)
    await db.execute(
        'UPDATE events SET payload = \'{"output": {"answer": 41}, "steps": 2, "tool_calls": 0}\''
        " WHERE stream = $1 AND tenant = 'acme' AND chain_index = $2",
        stream,
        ACME_EVENTS_TOTAL,
    )
    await rechain(db, stream, "acme")
    assert (await verify(settings, db, skip_stream=True)).findings == []
    report = await verify(settings, db)
    assert [(f.kind, f.stream_seq) for f in report.findings] == [  # type: ignore[attr-defined]
        ("stream_mismatch", await seq_at(db, stream, ACME_EVENTS_TOTAL))
    ]


async def rechain(db: asyncpg.Connection, stream: str, tenant: str) -> None:
    """What a tamperer who knows the (public) algorithm does: recompute a chain's hashes in place."""
    records = await db.fetch(
        "SELECT "
        + ", ".join("payload::text" if c == "payload" else c for c in CONTENT_COLUMNS)
        + " FROM events WHERE stream = $1 AND tenant = $2 ORDER BY stream_seq",
        stream,
        tenant,
    )
    for row in ChainHeads().chained([tuple(record) for record in records]):
        await db.execute(
            "UPDATE events SET chain_index = $3, chain_hash = $4 WHERE stream = $1 AND stream_seq = $2",
            stream,
            row[1],
            row[-2],
            row[-1],
        )


async def test_a_rewritten_signed_prefix_contradicts_its_checkpoint(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A row changed before the last checkpoint and the whole chain recomputed: the signed head no longer matches."""
    stream = await projected_audit(settings, nc, db, run_app)
    seq = await seq_at(db, stream, 2)
    await db.execute("UPDATE events SET actor = 'mallory' WHERE stream = $1 AND stream_seq = $2", stream, seq)
    await rechain(db, stream, "acme")
    assert "checkpoint_mismatch" in kinds(await verify(settings, db, skip_stream=True))


async def test_a_clean_stop_signs_what_the_chains_reached(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A projector that would not sign for an hour signs every chain's head when it stops cleanly, while it is
    still connected: a short-lived stack (the demo) leaves nothing unanchored."""
    for envelope in [*run_lifecycle("acme", "r1", steps=2), *run_lifecycle("globex", "r2", steps=1)]:
        await publish(nc, settings, envelope)
    patient = settings.model_copy(update={"checkpoint_every_events": 10**6, "checkpoint_every_seconds": 3600.0})
    projector = build_app(patient)
    await run_app(projector)
    await eventually(lambda: db.fetchval("SELECT count(*) > 0 AND count(*) = count(chain_hash) FROM events"))
    before = await verify(settings, db, skip_stream=True)
    assert before.checkpoints == 0
    assert before.unanchored == before.rows > 0
    await run_app.stop(projector)
    after = await verify(settings, db, skip_stream=True)
    assert after.intact, [finding.describe() for finding in after.findings]
    assert after.unanchored == 0
    assert after.checkpoints == len(after.chains)


async def test_replay_reproduces_the_chain_columns(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A replay (worker processes, one-sequence segments) writes the very chain values the live projector wrote."""
    await projected_audit(settings, nc, db, run_app)
    await replay(settings, "again", workers=2, segment_size=3)
    query = 'SELECT stream, stream_seq, chain_index, chain_hash FROM "{}".events ORDER BY 1, 2'
    live = [tuple(r) for r in await db.fetch(query.format("public"))]
    assert live
    assert all(row[3] is not None for row in live)
    assert [tuple(r) for r in await db.fetch(query.format("again"))] == live


async def test_a_forged_checkpoint_is_refused(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """A checkpoint signed with another key, appended where the projector's would go, is refused by the verifier."""
    stream = await projected_audit(settings, nc, db, run_app)
    names, subjects = StreamNames.for_prefix(settings.subject_prefix), Subjects(settings.subject_prefix)
    forger = Signer(nacl.signing.SigningKey.generate())
    head = bytes(await db.fetchval("SELECT chain_hash FROM events WHERE stream = $1 AND tenant = 'acme' "
                                   "AND chain_index = $2", stream, ACME_EVENTS_TOTAL))  # fmt: skip
    forged = _signed_for(forger, stream, ACME_EVENTS_TOTAL, head)
    await nc.jetstream().publish(subjects.checkpoint("acme", stream), forged.to_json(), stream=names.checkpoints)
    report = await verify(settings, db, skip_stream=True)
    assert [(f.kind, f.chain_index) for f in report.findings] == [("bad_checkpoint", ACME_EVENTS_TOTAL)]  # type: ignore[attr-defined]
    assert "signed with a key that is not trusted" in report.findings[0].describe()


def _signed_for(signer: Signer, stream: str, index: int, head: bytes) -> Checkpoint:
    unsigned = Checkpoint(stream, "acme", index, head, datetime.now(UTC), signer.public_key)
    return Checkpoint(**{**vars(unsigned), "signature": signer.sign_bytes(unsigned.signed_bytes())})


async def test_checkpoints_are_appended_in_order_and_never_erased(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner
) -> None:
    """Appended only on top of the chain's last checkpoint; neither the projector's identity nor anyone erases them."""
    await projected_audit(settings, nc, db, run_app)
    names, subjects = StreamNames.for_prefix(settings.subject_prefix), Subjects(settings.subject_prefix)
    js = nc.jetstream()
    subject = subjects.checkpoint("acme", names.events)
    last = await js.get_last_msg(names.checkpoints, subject)
    assert last.seq is not None
    # Not on top of the chain's last checkpoint (one earlier, or none at all): refused.
    for expected in (str(last.seq - 1), "0"):
        with pytest.raises(nats.js.errors.APIError, match="wrong last sequence"):
            await js.publish(
                subject, b"{}", stream=names.checkpoints, headers={EXPECTED_LAST_SUBJECT_SEQUENCE: expected}
            )
    seed = settings.seed_file_for(Role.AUDIT_PROJECTOR)
    projector = await connect(settings.nats_url, **connect_options(seed))
    try:
        refused = projector.jetstream()
        with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
            await refused.purge_stream(names.checkpoints)
        with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
            await refused.delete_msg(names.checkpoints, last.seq)
        with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
            await refused.delete_stream(names.checkpoints)
    finally:
        await projector.close()
    # The stream itself refuses, whoever asks (here the fixtures' superuser).
    with pytest.raises(nats.js.errors.APIError):
        await js.purge_stream(names.checkpoints)
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg(names.checkpoints, last.seq)
    assert (await js.get_last_msg(names.checkpoints, subject)).seq == last.seq
