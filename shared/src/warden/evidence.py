"""Evidence bundles: one tenant's audit rows, decisions, approvals, policies and checkpoints in files a
third party can check offline with nothing but two public keys: the checkpoint key's and the evidence key's.

A bundle is a directory:

- `events.jsonl`: every row of the tenant's chains (one per audited stream) from each chain's
  anchor on, in stream order. A row in scope carries its content (`row`: the values its content
  hash covers, as `warden.audit_chain` encodes them); a row out of scope (another run, before
  `--since`) only its content hash, so the chain still links through it without showing it.
- `checkpoints.jsonl`: the signed checkpoints of those chains, from each chain's anchor on.
- `decisions.jsonl`, `approvals.jsonl`: the decisions (effect, reasons, policy revision, input) and
  the approval requests and answers among the rows in scope, for a reader; each is derived from
  `events.jsonl` and the verifier derives it again, so neither can say anything the chain does not.
- `policies/<revision>/`: the files of every policy bundle a decision in scope names, as the gate
  recorded them (`policy.activated`); the verifier recomputes each revision from its files.
- `manifest.json`: what was asked for, each chain's anchor, and the SHA-256 of every other file,
  signed with the exporting operator's evidence key (`signature`: its public key and an Ed25519
  signature over `manifest_signed_bytes`), so that none of it can be changed, the scope narrowed
  or the file hashes re-sealed, without the key.

Nothing here touches a database or a server: the export (warden.audit_projector.export) gathers
the rows and checkpoints, `write_bundle` lays them out and `verify_bundle` checks a bundle.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from warden.audit_chain import (
    CONTENT_COLUMNS,
    BadCheckpoint,
    ChainId,
    ChainRow,
    ChainSummary,
    ChainVerifier,
    Checkpoint,
    Finding,
    Head,
    canonical_content,
    canonical_payload,
    encode_content,
    genesis,
)
from warden.errors import WardenError
from warden.policy_bundle import revision_of, revision_token
from warden.signing import Signer, TrustedKeys

BUNDLE_FORMAT = "warden-evidence-v1"
MANIFEST_FILE = "manifest.json"
# The manifest's field holding the exporter's signature over the rest of it.
SIGNATURE_FIELD = "signature"
EVENTS_FILE = "events.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
DECISIONS_FILE = "decisions.jsonl"
APPROVALS_FILE = "approvals.jsonl"
POLICIES_DIR = "policies"

APPROVAL_TYPES = ("approval.requested", "approval.answered")
_COLUMN = {name: index for index, name in enumerate(CONTENT_COLUMNS)}


class BundleError(WardenError):
    """A directory that is not an evidence bundle this version can read, or one that cannot be written."""


@dataclass(frozen=True)
class BundleRow:
    """One row of a chain in a bundle: its content (in scope) or only its content hash (out of scope)."""

    stream: str
    stream_seq: int
    tenant: str
    chain_index: int
    chain_hash: bytes
    content: tuple[Any, ...] | None  # the canonical values of CONTENT_COLUMNS (warden.audit_chain)
    content_hash: bytes

    @property
    def chain(self) -> ChainId:
        return (self.stream, self.tenant)

    def value(self, column: str) -> Any:
        return None if self.content is None else self.content[_COLUMN[column]]

    @property
    def payload(self) -> Any:
        """The envelope's data, parsed (None out of scope, or for a message that was no envelope)."""
        text = self.value("payload")
        return json.loads(text) if text is not None else None

    def to_line(self) -> str:
        line: dict[str, Any] = {
            "stream": self.stream,
            "stream_seq": self.stream_seq,
            "tenant": self.tenant,
            "chain_index": self.chain_index,
            "chain_hash": self.chain_hash.hex(),
        }
        if self.content is None:
            line["content_hash"] = self.content_hash.hex()
        else:
            # The payload shown as the JSON it is, not as the text the hash covers: the text is its
            # canonical form, which `from_line` rebuilds from the value exactly.
            line["row"] = dict(zip(CONTENT_COLUMNS, self.content, strict=True)) | {"payload": self.payload}
        return json.dumps(line, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_line(cls, text: str) -> BundleRow:
        """A row as `to_line` wrote it; its content hash computed from its content when it has one."""
        line = json.loads(text)
        row = line.get("row")
        if row is None:
            content, content_hash = None, bytes.fromhex(line["content_hash"])
        else:
            values = [row[name] for name in CONTENT_COLUMNS]
            payload = values[_COLUMN["payload"]]
            values[_COLUMN["payload"]] = canonical_payload(json.dumps(payload)) if payload is not None else None
            content = tuple(values)
            content_hash = hashlib.sha256(encode_content(content)).digest()
        return cls(
            stream=str(line["stream"]),
            stream_seq=int(line["stream_seq"]),
            tenant=str(line["tenant"]),
            chain_index=int(line["chain_index"]),
            chain_hash=bytes.fromhex(line["chain_hash"]),
            content=content,
            content_hash=content_hash,
        )

    @classmethod
    def of_table_row(cls, row: Sequence[Any], chain_index: int, chain_hash: bytes, *, in_scope: bool) -> BundleRow:
        """A bundle row from an `events` row (CONTENT_COLUMNS leading, as the table holds them)."""
        content = tuple(canonical_content(row))
        return cls(
            stream=row[_COLUMN["stream"]],
            stream_seq=row[_COLUMN["stream_seq"]],
            tenant=row[_COLUMN["tenant"]],
            chain_index=chain_index,
            chain_hash=chain_hash,
            content=content if in_scope else None,
            content_hash=hashlib.sha256(encode_content(content)).digest(),
        )


@dataclass(frozen=True)
class ChainExcerpt:
    """The rows of one chain a bundle holds: from just after `anchor` (a checkpoint's index, or 0) on."""

    stream: str
    tenant: str
    anchor_index: int
    rows: list[BundleRow]


@dataclass(frozen=True)
class Scope:
    """What an export was asked for."""

    tenant: str
    run_id: str | None = None
    since: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "run_id": self.run_id,
            "since": self.since.isoformat() if self.since is not None else None,
        }


def decision_lines(rows: Iterable[BundleRow]) -> list[str]:
    """The decisions among the rows in scope, one JSON line each: what `decisions.jsonl` holds."""
    lines = []
    for row in rows:
        if row.content is None or row.value("type") != "decision.made":
            continue
        data = row.payload or {}
        lines.append(
            _line(
                {
                    "stream": row.stream,
                    "stream_seq": row.stream_seq,
                    "run_id": row.value("entity_id"),
                    "decision_id": data.get("decision_id"),
                    "request_type": data.get("request_type"),
                    "effect": data.get("effect"),
                    "reasons": data.get("reasons"),
                    "policy_revision": data.get("policy_revision"),
                    "input": data.get("input"),
                    "signing_key": data.get("signing_key"),
                    "signature": data.get("signature"),
                }
            )
        )
    return lines


def approval_lines(rows: Iterable[BundleRow]) -> list[str]:
    """The approval requests and answers among the rows in scope: what `approvals.jsonl` holds."""
    return [
        _line(
            {
                "stream": row.stream,
                "stream_seq": row.stream_seq,
                "type": row.value("type"),
                "run_id": row.value("entity_id"),
                "actor": row.value("actor"),
                "time_us": row.value("time"),
                "data": row.payload,
            }
        )
        for row in rows
        if row.content is not None and row.value("type") in APPROVAL_TYPES
    ]


def revisions_named(rows: Iterable[BundleRow]) -> set[str]:
    """The policy revisions the decisions in scope were made under."""
    return {
        revision
        for row in rows
        if row.content is not None and row.value("type") == "decision.made"
        if isinstance(revision := (row.payload or {}).get("policy_revision"), str)
    }


def _line(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def _jsonl(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def manifest_signed_bytes(manifest: Mapping[str, Any]) -> bytes:
    """What the evidence key signs: the manifest without its signature, as canonical JSON (sorted keys,
    compact separators, UTF-8), so anyone can recompute it from the file with any JSON library.

    No prefix as decisions and checkpoints have: the evidence key signs nothing else, and the
    manifest's own `format` field names what the bytes are.
    """
    unsigned = {name: value for name, value in manifest.items() if name != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(manifest: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """The manifest with `signer`'s signature over the rest of it (public key as its .pub file lists it)."""
    signature = {"key": signer.public_key, "value": signer.sign_bytes(manifest_signed_bytes(manifest))}
    return {**manifest, SIGNATURE_FIELD: signature}


def write_bundle(
    directory: Path,
    scope: Scope,
    chains: Sequence[ChainExcerpt],
    checkpoints: Sequence[Checkpoint],
    policies: Mapping[str, Mapping[str, str]],
    *,
    signer: Signer,
    exported_at: datetime,
    unrecorded_revisions: Iterable[str] = (),
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write a bundle into `directory` (new, or empty); return its manifest, signed by `signer` (the
    operator's evidence key).

    `unrecorded_revisions`: revisions decisions in scope name whose files no `policy.activated`
    event holds (decisions made before gates recorded their bundles): listed, so a reader knows.
    """
    if directory.exists() and any(directory.iterdir()):
        raise BundleError(f"{directory} is not empty: an evidence bundle is written into a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    rows = [row for chain in chains for row in chain.rows]
    files: dict[str, bytes] = {
        EVENTS_FILE: _jsonl(row.to_line() for row in rows),
        CHECKPOINTS_FILE: _jsonl(checkpoint.to_json().decode() for checkpoint in checkpoints),
        DECISIONS_FILE: _jsonl(decision_lines(rows)),
        APPROVALS_FILE: _jsonl(approval_lines(rows)),
    }
    for revision, bundle_files in sorted(policies.items()):
        for name, text in sorted(bundle_files.items()):
            files[f"{POLICIES_DIR}/{revision_token(revision)}/{name}"] = text.encode()
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    manifest = {
        "format": BUNDLE_FORMAT,
        "scope": scope.as_json(),
        "exported_at": exported_at.isoformat(),
        "chains": [
            {
                "stream": chain.stream,
                "tenant": chain.tenant,
                "anchor_index": chain.anchor_index,
                "rows": len(chain.rows),
                "in_scope": sum(1 for row in chain.rows if row.content is not None),
                "last_index": chain.rows[-1].chain_index if chain.rows else chain.anchor_index,
            }
            for chain in chains
        ],
        "policy_revisions": sorted(policies),
        "unrecorded_policy_revisions": sorted(set(unrecorded_revisions)),
        "notes": list(notes),
        "files": {name: hashlib.sha256(content).hexdigest() for name, content in sorted(files.items())},
    }
    manifest = sign_manifest(manifest, signer)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


# What the bundle check finds beyond the chain findings of warden.audit_chain.


@dataclass(frozen=True)
class FileMismatch(Finding):
    file: str
    reason: str
    kind = "file_mismatch"

    def describe(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class ManifestUnsigned(Finding):
    kind = "manifest_unsigned"

    def describe(self) -> str:
        return f"{MANIFEST_FILE} is not signed: no exporter vouches for its scope, anchors or file hashes"


@dataclass(frozen=True)
class ManifestUntrustedKey(Finding):
    key: str
    kind = "manifest_untrusted_key"

    def describe(self) -> str:
        # repr(): the key is whatever the bundle says, so nothing in it reaches a terminal unescaped.
        return f"{MANIFEST_FILE} is signed with {self.key!r}, which is not a trusted evidence key"


@dataclass(frozen=True)
class ManifestBadSignature(Finding):
    key: str
    reason: str
    kind = "manifest_bad_signature"

    def describe(self) -> str:
        return f"{MANIFEST_FILE}: {self.reason}"


@dataclass(frozen=True)
class PolicyMismatch(Finding):
    revision: str
    reason: str
    kind = "policy_mismatch"

    def describe(self) -> str:
        return f"policy {self.revision}: {self.reason}"


@dataclass
class BundleReport:
    """What checking a bundle found: nothing, when it is intact and every checkpoint in it verifies."""

    scope: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    # The trusted evidence key whose signature over the manifest holds (None: none does).
    signed_by: str | None = None
    chains: list[ChainSummary] = field(default_factory=list)
    rows: int = 0
    in_scope: int = 0
    decisions: int = 0
    checkpoints: int = 0
    policy_revisions: int = 0
    # Revisions decisions name that were never recorded (the export says so): not checkable, not hidden.
    unrecorded_revisions: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.findings

    @property
    def unanchored(self) -> int:
        """Rows past their chain's last checkpoint in the bundle: intact as far as the chain shows, but no
        signature vouches for them yet."""
        return sum(chain.unanchored for chain in self.chains)

    def as_json(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "scope": self.scope,
            "signed_by": self.signed_by,
            "rows": self.rows,
            "in_scope": self.in_scope,
            "decisions": self.decisions,
            "checkpoints": self.checkpoints,
            "policy_revisions": self.policy_revisions,
            "unrecorded_policy_revisions": self.unrecorded_revisions,
            "unanchored": self.unanchored,
            "chains": [vars(chain) | {"unanchored": chain.unanchored} for chain in self.chains],
            "findings": [finding.as_dict() for finding in self.findings],
        }


def verify_bundle(directory: Path, trusted: TrustedKeys, exporters: TrustedKeys) -> BundleReport:
    """Check a bundle offline: the manifest's signature against the evidence keys `exporters` trusts,
    its files against the manifest, every chain from its anchor against the checkpoints `trusted`
    signed, the derived files against the rows, each policy against its revision.

    Raises BundleError when `directory` is not a bundle at all.
    """
    manifest = _read_manifest(directory)
    report = BundleReport(scope=manifest.get("scope") or {})
    # Every check below reads the manifest parsed here, which is what the signature is checked over.
    _check_signature(manifest, exporters, report)
    listed: dict[str, str] = manifest.get("files") or {}
    _check_files(directory, listed, report)
    rows = _read_rows(directory, listed, report)
    checkpoints = _read_checkpoints(directory, listed, trusted, report)
    _check_chains(manifest, rows, checkpoints, report)
    _check_derived(directory, listed, rows, report)
    _check_policies(directory, manifest, rows, report)
    return report


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{directory}: no {MANIFEST_FILE}: not an evidence bundle") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{directory / MANIFEST_FILE}: unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{directory}: not a {BUNDLE_FORMAT} bundle (format {found!r})")
    return manifest


def _check_signature(manifest: Mapping[str, Any], exporters: TrustedKeys, report: BundleReport) -> None:
    """Whether a trusted evidence key signed the manifest as it is; the other checks go on either way, so
    a bundle changed and re-sealed is reported with what was changed too."""
    signature = manifest.get(SIGNATURE_FIELD)
    if signature is None:
        report.findings.append(ManifestUnsigned("", ""))
        return
    key = signature.get("key") if isinstance(signature, dict) else None
    value = signature.get("value") if isinstance(signature, dict) else None
    if not isinstance(key, str) or not isinstance(value, str) or not key or not value:
        report.findings.append(ManifestBadSignature("", "", repr(key), "its signature is not a key and a value"))
        return
    if key not in exporters.keys:
        report.findings.append(ManifestUntrustedKey("", "", key))
        return
    refusal = exporters.refusal_of(manifest_signed_bytes(manifest), key, value)
    if refusal is not None:
        report.findings.append(ManifestBadSignature("", "", key, f"{refusal}: it is not what the exporter signed"))
    else:
        report.signed_by = key


def _check_files(directory: Path, listed: Mapping[str, str], report: BundleReport) -> None:
    present = {
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path != directory / MANIFEST_FILE  # a manifest.json deeper down is just a file
    }
    for name in sorted(present - set(listed)):
        report.findings.append(FileMismatch("", "", name, "not listed in the manifest: added"))
    for name, digest in sorted(listed.items()):
        path = directory / name
        if name not in present:
            report.findings.append(FileMismatch("", "", name, "listed in the manifest but missing"))
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            report.findings.append(FileMismatch("", "", name, "its SHA-256 is not the manifest's: changed"))


def _lines(directory: Path, name: str, listed: Mapping[str, str]) -> list[str]:
    if name not in listed or not (directory / name).is_file():
        return []
    return [line for line in (directory / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_rows(directory: Path, listed: Mapping[str, str], report: BundleReport) -> list[BundleRow]:
    rows = []
    for number, text in enumerate(_lines(directory, EVENTS_FILE, listed), start=1):
        try:
            rows.append(BundleRow.from_line(text))
        except (ValueError, KeyError, TypeError) as exc:
            report.findings.append(FileMismatch("", "", EVENTS_FILE, f"line {number} is not a bundle row: {exc!r}"))
    report.rows = len(rows)
    report.in_scope = sum(1 for row in rows if row.content is not None)
    report.decisions = len(decision_lines(rows))
    return rows


def _read_checkpoints(
    directory: Path, listed: Mapping[str, str], trusted: TrustedKeys, report: BundleReport
) -> list[Checkpoint]:
    """The checkpoints whose signature `trusted` vouches for; every other one is a finding."""
    good = []
    for number, text in enumerate(_lines(directory, CHECKPOINTS_FILE, listed), start=1):
        try:
            checkpoint = Checkpoint.from_json(text.encode())
        except (ValueError, KeyError, TypeError) as exc:
            report.findings.append(
                FileMismatch("", "", CHECKPOINTS_FILE, f"line {number} is not a checkpoint: {exc!r}")
            )
            continue
        refusal = trusted.refusal_of(checkpoint.signed_bytes(), checkpoint.signing_key, checkpoint.signature)
        if refusal is not None:
            report.findings.append(BadCheckpoint(checkpoint.stream, checkpoint.tenant, checkpoint.index, refusal))
        else:
            good.append(checkpoint)
    report.checkpoints = len(good)
    return good


def _check_chains(
    manifest: Mapping[str, Any], rows: Sequence[BundleRow], checkpoints: Sequence[Checkpoint], report: BundleReport
) -> None:
    """Each chain from its anchor (a verified checkpoint, or the chain's start) through its rows."""
    by_chain: dict[ChainId, dict[int, Checkpoint]] = {}
    for checkpoint in checkpoints:
        by_chain.setdefault(checkpoint.chain, {})[checkpoint.index] = checkpoint
    anchors: dict[ChainId, Head] = {}
    for chain in manifest.get("chains") or []:
        chain_id = (str(chain.get("stream")), str(chain.get("tenant")))
        index = int(chain.get("anchor_index") or 0)
        if index == 0:
            anchors[chain_id] = Head(0, genesis(chain_id))
            continue
        anchor = by_chain.get(chain_id, {}).get(index)
        if anchor is None:
            # Without a verified checkpoint to start from, nothing in this chain can be vouched for.
            report.findings.append(
                BadCheckpoint(*chain_id, index, "the chain's anchor checkpoint is missing or refused")
            )
            anchors[chain_id] = Head(index, b"")
        else:
            anchors[chain_id] = Head(index, anchor.head)
    verifier = ChainVerifier(checkpoints, anchors=anchors)
    for row in rows:
        if row.chain not in anchors:
            report.findings.append(
                FileMismatch(*row.chain, EVENTS_FILE, f"row {row.stream_seq}: its chain is not in the manifest")
            )
            continue
        verifier.add(
            ChainRow(row.stream, row.stream_seq, row.tenant, row.chain_index, row.chain_hash, row.content_hash)
        )
    report.chains = verifier.finish()
    report.findings.extend(verifier.findings)


def _check_derived(directory: Path, listed: Mapping[str, str], rows: Sequence[BundleRow], report: BundleReport) -> None:
    for name, derive in ((DECISIONS_FILE, decision_lines), (APPROVALS_FILE, approval_lines)):
        if _lines(directory, name, listed) != derive(rows):
            report.findings.append(FileMismatch("", "", name, f"does not say what the rows of {EVENTS_FILE} say"))


def _check_policies(
    directory: Path, manifest: Mapping[str, Any], rows: Sequence[BundleRow], report: BundleReport
) -> None:
    recorded = set(manifest.get("policy_revisions") or [])
    for revision in sorted(recorded):
        folder = directory / POLICIES_DIR / revision_token(revision)
        files = {path.name: path.read_bytes() for path in folder.glob("*") if path.is_file()} if folder.is_dir() else {}
        if not files:
            report.findings.append(PolicyMismatch("", "", revision, "its files are missing"))
        elif revision_of(files) != revision:
            report.findings.append(
                PolicyMismatch("", "", revision, f"its files are revision {revision_of(files)}: changed")
            )
    report.policy_revisions = len(recorded)
    unrecorded = set(manifest.get("unrecorded_policy_revisions") or [])
    for revision in sorted(revisions_named(rows) - recorded):
        if revision in unrecorded:
            report.unrecorded_revisions.append(revision)
        else:
            report.findings.append(
                PolicyMismatch("", "", revision, "a decision names it, and the bundle does not hold it")
            )
