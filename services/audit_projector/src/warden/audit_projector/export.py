"""`warden audit export`: one tenant's evidence, gathered from the audit tables and the checkpoints stream
into a bundle (warden.evidence), its manifest signed with the operator's evidence key, that anyone
holding the checkpoint and evidence public keys can check offline.

Each of the tenant's chains (one per audited stream) is exported from an anchor: the chain's start,
or, with `since`, the last checkpoint before the first row stored at or after `since`, so the
bundle stays small and still links to a signed head. Rows between the anchor and `since`, and rows
of other runs when one run is asked for, go in as their content hash only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pydantic_core
from nats.aio.client import Client as NatsClient

from warden.audit_chain import CONTENT_COLUMNS, Checkpoint
from warden.evidence import BundleRow, ChainExcerpt, Scope, revisions_named, write_bundle
from warden.messages import PolicyActivated
from warden.reader import read_stored
from warden.signing import Signer
from warden.streams import StreamNames
from warden.subjects import Subjects

_STORED_AT = CONTENT_COLUMNS.index("stored_at")
_ENTITY_ID = CONTENT_COLUMNS.index("entity_id")

_SELECT_CHAIN = (
    "SELECT "
    + ", ".join("payload::text" if column == "payload" else column for column in CONTENT_COLUMNS)
    + ", chain_index, chain_hash FROM events"
    " WHERE stream = $1 AND tenant = $2 AND chain_index > $3 ORDER BY stream_seq"
)
_FIRST_SINCE = (
    "SELECT min(chain_index) FROM events WHERE stream = $1 AND tenant = $2 AND chain_index IS NOT NULL"
    " AND stored_at >= $3"
)
_UNCHAINED = "SELECT count(*) FROM events WHERE tenant = $1 AND chain_index IS NULL"
_BUNDLES = "SELECT payload::text FROM events WHERE type = $1 AND tenant = '_warden' AND payload->>'revision' = ANY($2)"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    directory: Path
    manifest: dict[str, Any]
    rows: int
    in_scope: int
    checkpoints: int


async def export_evidence(
    nc: NatsClient,
    database: asyncpg.Connection,
    prefix: str,
    scope: Scope,
    directory: Path,
    *,
    signer: Signer,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the evidence bundle of `scope` into `directory` (new, or empty), its manifest signed by
    `signer` (the operator's evidence key)."""
    say = progress or (lambda _: None)
    names = StreamNames.for_prefix(prefix)
    checkpoints = await tenant_checkpoints(nc, names, Subjects(prefix), scope.tenant)
    say(f"{len(checkpoints)} checkpoints of tenant {scope.tenant} read")
    excerpts: list[ChainExcerpt] = []
    included: list[Checkpoint] = []
    async with database.transaction(readonly=True, isolation="repeatable_read"):
        for stream in names.audited:
            signed = sorted((c for c in checkpoints if c.stream == stream), key=lambda c: c.index)
            anchor = await _anchor(database, stream, scope, signed)
            records = await database.fetch(_SELECT_CHAIN, stream, scope.tenant, anchor)
            rows = [
                BundleRow.of_table_row(
                    tuple(record.values()),
                    record["chain_index"],
                    record["chain_hash"],
                    in_scope=_in_scope(record, scope),
                )
                for record in records
            ]
            excerpts.append(ChainExcerpt(stream, scope.tenant, anchor, rows))
            included += [checkpoint for checkpoint in signed if checkpoint.index >= anchor]
            say(f"{stream}: {len(rows)} rows from chain index {anchor + 1}")
        revisions = revisions_named(row for excerpt in excerpts for row in excerpt.rows)
        policies: dict[str, dict[str, str]] = {}
        for record in await database.fetch(_BUNDLES, PolicyActivated.TYPE, sorted(revisions)):
            activated = pydantic_core.from_json(record[0])
            policies[activated["revision"]] = activated["files"]
        unchained = await database.fetchval(_UNCHAINED, scope.tenant)
    notes = []
    if unchained:
        notes.append(f"{unchained} row(s) of the tenant were stored before the audit was chained: not exported")
    unrecorded = revisions - set(policies)
    manifest = write_bundle(
        directory,
        scope,
        excerpts,
        included,
        policies,
        signer=signer,
        exported_at=datetime.now(UTC),
        unrecorded_revisions=unrecorded,
        notes=notes,
    )
    rows = [row for excerpt in excerpts for row in excerpt.rows]
    return ExportResult(
        directory=directory,
        manifest=manifest,
        rows=len(rows),
        in_scope=sum(1 for row in rows if row.content is not None),
        checkpoints=len(included),
    )


def _in_scope(record: asyncpg.Record, scope: Scope) -> bool:
    if scope.since is not None and record[_STORED_AT] < scope.since:
        return False
    return scope.run_id is None or record[_ENTITY_ID] == scope.run_id


async def _anchor(database: asyncpg.Connection, stream: str, scope: Scope, signed: list[Checkpoint]) -> int:
    """The chain index the excerpt starts after: 0 (the chain's start), or with `since` the last
    checkpoint before the first row stored since then (the chain's last one if none is)."""
    if scope.since is None:
        return 0
    first = await database.fetchval(_FIRST_SINCE, stream, scope.tenant, scope.since)
    before = [checkpoint.index for checkpoint in signed if first is None or checkpoint.index < first]
    return max(before, default=0)


async def tenant_checkpoints(nc: NatsClient, names: StreamNames, subjects: Subjects, tenant: str) -> list[Checkpoint]:
    """Every checkpoint stored for the tenant's chains (unchecked: the bundle's verifier checks each)."""
    stored: list[bytes] = []
    for stream in names.audited:
        await read_stored(
            nc,
            names.checkpoints,
            subjects.checkpoint(tenant, stream),
            lambda _seq, body: stored.append(body),
            what="checkpoints",
        )
    found = []
    for body in stored:
        try:
            found.append(Checkpoint.from_json(body))
        except (ValueError, KeyError, TypeError):
            continue  # not a checkpoint: `warden audit verify` reports it; a bundle has no use for it
    return found
