"""The audit hash chain: its pure code, and tampering with a real projection found by `warden audit verify`."""

import dataclasses
from datetime import UTC, datetime

import nacl.signing
import pytest

from warden.audit_chain import (
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
    canonical_payload,
    content_hash,
)
from warden.signing import Signer, TrustedKeys

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
    """A payload read back from jsonb (integral floats spelt out, keys reordered) hashes as the projector's JSON."""
    written = '{"b": 1e16, "a": [100000.0, 0.1, 1.5e-07, -0.0, 12345678901234567890]}'
    from_postgres = '{"a": [100000.0, 0.1, 0.00000015, 0.0, 12345678901234567890], "b": 10000000000000000}'
    assert canonical_payload(written) == canonical_payload(from_postgres)
    assert content_hash(_row(1, payload=written)) == content_hash(_row(1, payload=from_postgres))
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
