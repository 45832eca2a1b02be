"""Evidence bundles: `warden audit export` of governed runs on the real servers, checked offline by
`warden audit verify --bundle` with only the checkpoint and evidence public keys, and each tampering with a
bundle found."""

import base64
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nacl.signing
import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import AppRunner, eventually, run_warden_cli, warden_cli
from tests.test_governed_run import run_row, start_all
from warden.audit_projector.verify import verify
from warden.cli import AUDIT_NOT_INTACT, USAGE_ERROR
from warden.client import WardenClient
from warden.credentials import CredentialStore
from warden.evidence import (
    APPROVALS_FILE,
    CHECKPOINTS_FILE,
    DECISIONS_FILE,
    EVENTS_FILE,
    MANIFEST_FILE,
    POLICIES_DIR,
    BundleReport,
    BundleRow,
    Scope,
    approval_lines,
    decision_lines,
    manifest_signed_bytes,
    sign_manifest,
    verify_bundle,
    write_bundle,
)
from warden.settings import Settings
from warden.signing import EVIDENCE_KEYS_FILE, Signer, TrustedKeys


@dataclass(frozen=True)
class History:
    """Governed runs projected and checkpointed: two of acme's (one before `between`, one after), one of globex's."""

    settings: Settings
    first_run: str
    second_run: str
    other_tenant_run: str
    between: datetime


async def governed_history(settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner) -> History:
    checkpointing = settings.model_copy(
        update={"checkpoint_every_events": 4, "checkpoint_every_seconds": 0.2, "tenant_concurrency": 3}
    )
    await start_all(run_app, checkpointing)
    client = WardenClient(nc, settings.subject_prefix)

    async def governed_run(tenant: str, actor: str) -> str:
        receipt = await client.submit_run(tenant=tenant, agent="demo", actor=actor, input={"question": "why?"})
        run = await eventually(await run_row(db, receipt.run_id, ("succeeded", "failed")), within=30)
        assert run["status"] == "succeeded", run["error"]
        return receipt.run_id

    async def all_anchored() -> bool:
        report = await verify(settings, db, skip_stream=True)
        return report.intact and report.checkpoints > 0 and report.unanchored == 0

    first = await governed_run("acme", "alice")
    other = await governed_run("globex", "gina")
    await eventually(all_anchored, within=30)
    between = datetime.now(UTC)
    second = await governed_run("acme", "alice")
    await eventually(all_anchored, within=30)
    return History(settings, first, second, other, between)


def keys_file(settings: Settings) -> Path:
    return settings.checkpoint_keys_path()


def export_keys_file(settings: Settings) -> Path:
    return settings.evidence_keys_path()


def trusted(path: Path) -> TrustedKeys:
    return TrustedKeys(TrustedKeys.read(path))


async def export(history: History, out: Path, *options: str) -> Path:
    await warden_cli(history.settings, "audit", "export", "--tenant", "acme", "--out", str(out), "--quiet", *options)
    return out


def events_lines(bundle: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (bundle / EVENTS_FILE).read_text().splitlines()]


def check(bundle: Path, settings: Settings) -> BundleReport:
    return verify_bundle(bundle, trusted(keys_file(settings)), trusted(export_keys_file(settings)))


def kinds(report: BundleReport) -> set[str]:
    return {finding.kind for finding in report.findings}


async def test_a_tenants_bundle_verifies_offline_with_only_the_public_key(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """The export holds acme's rows only, its decisions with their inputs and revisions, the policy bundle they
    name and signed checkpoints, under a signed manifest; verified from the files and the two public keys
    alone (moved away, no stack needed)."""
    history = await governed_history(settings, nc, db, run_app)
    bundle = tmp_path / "bundle"
    output = await warden_cli(settings, "audit", "export", "--tenant", "acme", "--out", str(bundle), "--quiet")
    assert f"--bundle {bundle} --keys <checkpoint-keys.pub> --export-keys <evidence-keys.pub>" in output
    moved = Path(shutil.move(bundle, tmp_path / "elsewhere"))
    key = Path(shutil.copy(keys_file(settings), tmp_path / "checkpoint-keys.pub"))
    export_key = Path(shutil.copy(export_keys_file(settings), tmp_path / EVIDENCE_KEYS_FILE))

    offline = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no WARDEN_* variables: no stack to find
    result = await run_warden_cli(
        settings,
        "audit",
        "verify",
        "--bundle",
        str(moved),
        "--keys",
        str(key),
        "--export-keys",
        str(export_key),
        "--json",
        env=offline,
    )
    assert result.status == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["intact"]
    assert report["findings"] == []
    (exporter,) = TrustedKeys.read(export_key)
    assert report["signed_by"] == exporter
    assert json.loads((moved / MANIFEST_FILE).read_text())["signature"]["key"] == exporter
    assert report["unanchored"] == 0
    assert report["checkpoints"] >= 2
    assert report["policy_revisions"] == 1

    lines = events_lines(moved)
    assert {line["tenant"] for line in lines} == {"acme"}
    runs = {line["row"]["entity_id"] for line in lines if "row" in line and line["row"]["type"] == "run.succeeded"}
    assert runs == {history.first_run, history.second_run}
    decisions = [json.loads(line) for line in (moved / DECISIONS_FILE).read_text().splitlines()]
    assert {d["run_id"] for d in decisions} == {history.first_run, history.second_run}
    assert all(d["input"] is not None and d["policy_revision"] for d in decisions)
    (revision_dir,) = (moved / POLICIES_DIR).iterdir()
    assert {path.name for path in revision_dir.iterdir()} >= {"authz.rego", "data.json"}
    assert revision_dir.name == decisions[0]["policy_revision"].replace(":", "-")

    # Without the evidence keys, and no installation to take them from: told what to give, at once.
    result = await run_warden_cli(settings, "audit", "verify", "--bundle", str(moved), "--keys", str(key), env=offline)
    assert result.status == USAGE_ERROR
    assert result.stderr.strip() == (
        "warden: give --export-keys FILE: the evidence public keys (evidence-keys.pub) to check the bundle with"
    )
    # Or named by the variables the services read them from.
    named = {**offline, "WARDEN_CHECKPOINT_KEYS_FILE": str(key), "WARDEN_EVIDENCE_KEYS_FILE": str(export_key)}
    result = await run_warden_cli(settings, "audit", "verify", "--bundle", str(moved), "--quiet", env=named)
    assert result.status == 0, result.stdout + result.stderr


async def test_a_runs_bundle_shows_that_run_and_links_through_the_others(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """--run: rows of other runs are there as hashes only, so the chain links from its start and verifies."""
    history = await governed_history(settings, nc, db, run_app)
    bundle = await export(history, tmp_path / "run", "--run", history.second_run)
    lines = events_lines(bundle)
    shown = [line for line in lines if "row" in line]
    assert shown
    assert {line["row"]["entity_id"] for line in shown} == {history.second_run}
    assert any("content_hash" in line for line in lines), "the first run's rows are in as hashes"
    report = check(bundle, settings)
    assert report.intact, [finding.describe() for finding in report.findings]
    assert report.in_scope == len(shown) < report.rows


async def test_a_bundle_since_a_time_starts_at_a_checkpoint_before_it(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """--since: each chain starts after the last checkpoint before the first row since then, and still verifies."""
    history = await governed_history(settings, nc, db, run_app)
    bundle = await export(history, tmp_path / "since", "--since", history.between.isoformat())
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    events_chain = next(chain for chain in manifest["chains"] if chain["stream"].endswith("_EVENTS"))
    assert events_chain["anchor_index"] > 0
    assert min(line["chain_index"] for line in events_lines(bundle) if line["stream"] == events_chain["stream"]) == (
        events_chain["anchor_index"] + 1
    )
    shown_runs = {line["row"]["entity_id"] for line in events_lines(bundle) if "row" in line}
    assert history.first_run not in shown_runs
    assert history.second_run in shown_runs
    report = check(bundle, settings)
    assert report.intact, [finding.describe() for finding in report.findings]


def rewrite(bundle: Path, name: str, edit: Callable[[str], str], *, reseal: bool = True) -> None:
    """Change a file of the bundle; with `reseal`, put its new hash in the manifest too, as a forger would."""
    path = bundle / name
    path.write_text(edit(path.read_text()))
    if reseal:
        manifest = json.loads((bundle / MANIFEST_FILE).read_text())
        manifest["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
        (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


def edit_line(index: Callable[[list[str]], int], change: Callable[[dict[str, object]], object]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        lines = text.splitlines()
        at = index(lines)
        document = json.loads(lines[at])
        changed = change(document)
        if changed is None:
            del lines[at]
        else:
            lines[at] = json.dumps(changed)
        return "".join(line + "\n" for line in lines)

    return edit


def first_decision(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if '"decision.made"' in line and '"row"' in line)


def with_effect_allow(document: dict[str, object]) -> dict[str, object]:
    row = document["row"]
    assert isinstance(row, dict)
    row["payload"]["effect"] = "allow" if row["payload"]["effect"] != "allow" else "deny"
    return document


async def test_each_tampering_with_a_bundle_is_found(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """A changed row, a dropped row, an altered or foreign checkpoint, a changed policy, a derived file that says
    otherwise, an unlisted change: each found, and when the forger re-seals the manifest, found too and the
    manifest's signature refused."""
    history = await governed_history(settings, nc, db, run_app)
    original = await export(history, tmp_path / "original")
    assert check(original, settings).intact

    def tampered(name: str) -> Path:
        return Path(shutil.copytree(original, tmp_path / name))

    cases: list[tuple[str, Callable[[Path], None], str]] = [
        ("changed-row", lambda b: rewrite(b, EVENTS_FILE, edit_line(first_decision, with_effect_allow)), "changed_row"),
        ("dropped-row", lambda b: rewrite(b, EVENTS_FILE, edit_line(lambda lines: 3, lambda d: None)), "missing_rows"),
        (
            "altered-checkpoint",
            lambda b: rewrite(b, CHECKPOINTS_FILE, edit_line(lambda lines: 0, lambda d: {**d, "index": 2})),
            "bad_checkpoint",
        ),
        (
            "changed-policy",
            lambda b: rewrite(
                b,
                next(p.relative_to(b).as_posix() for p in (b / POLICIES_DIR).rglob("data.json")),
                lambda text: text.replace("example.com", "evil.example.net"),
            ),
            "policy_mismatch",
        ),
        (
            "derived-file",
            lambda b: rewrite(b, DECISIONS_FILE, lambda text: text.replace('"deny"', '"allow"')),
            "file_mismatch",
        ),
        ("unsealed-change", lambda b: rewrite(b, DECISIONS_FILE, lambda t: t + "\n", reseal=False), "file_mismatch"),
    ]
    for name, tamper, kind in cases:
        bundle = tampered(name)
        tamper(bundle)
        report = check(bundle, settings)
        assert kind in kinds(report), (name, report.as_json())
        # A re-sealed manifest is no longer the one the exporter signed; an unsealed change leaves it as signed.
        resealed = name != "unsealed-change"
        assert ("manifest_bad_signature" in kinds(report)) == resealed, (name, report.as_json())
        assert (report.signed_by is None) == resealed

    stranger = Signer(nacl.signing.SigningKey.generate())
    foreign = verify_bundle(original, TrustedKeys([stranger.public_key]), trusted(export_keys_file(settings)))
    assert not foreign.intact
    assert kinds(foreign) == {"bad_checkpoint"}

    result = await run_warden_cli(
        settings, "audit", "verify", "--bundle", str(tmp_path / "changed-row"), "--keys", str(keys_file(settings))
    )
    assert result.status == AUDIT_NOT_INTACT
    assert "changed_row" in result.stdout
    assert "manifest_bad_signature" in result.stdout
    assert "NOT INTACT" in result.stdout


def narrow_to_run(bundle: Path, run_id: str) -> None:
    """Cut a tenant's bundle down to one run, every file consistent with the others, and re-seal the manifest:
    what an unsigned manifest let anyone do (the other runs' rows go to hashes, as an export of the run has)."""
    rows = [BundleRow.from_line(line) for line in (bundle / EVENTS_FILE).read_text().splitlines()]
    rows = [
        row if row.content is None or row.value("entity_id") == run_id else dataclasses.replace(row, content=None)
        for row in rows
    ]
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    for name, lines in (
        (EVENTS_FILE, [row.to_line() for row in rows]),
        (DECISIONS_FILE, decision_lines(rows)),
        (APPROVALS_FILE, approval_lines(rows)),
    ):
        (bundle / name).write_text("".join(line + "\n" for line in lines))
        manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    manifest["scope"]["run_id"] = run_id
    for chain in manifest["chains"]:
        chain["in_scope"] = sum(1 for row in rows if row.stream == chain["stream"] and row.content is not None)
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))


async def test_a_bundle_is_only_what_a_trusted_exporter_signed(
    settings: Settings, nc: NatsClient, db: asyncpg.Connection, run_app: AppRunner, tmp_path: Path
) -> None:
    """A bundle narrowed to one run and re-sealed, one whose signature is stripped, one re-signed by a forger,
    and one checked with another installation's evidence key: each refused by the manifest's signature alone
    (every other check passes), so the signature is what catches it."""
    history = await governed_history(settings, nc, db, run_app)
    original = await export(history, tmp_path / "original")
    assert check(original, settings).signed_by == TrustedKeys.read(export_keys_file(settings))[0]

    narrowed = Path(shutil.copytree(original, tmp_path / "narrowed"))
    narrow_to_run(narrowed, history.second_run)
    report = check(narrowed, settings)
    assert report.scope["run_id"] == history.second_run
    assert report.in_scope < report.rows
    assert kinds(report) == {"manifest_bad_signature"}, report.as_json()

    manifest = json.loads((narrowed / MANIFEST_FILE).read_text())
    del manifest["signature"]
    (narrowed / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert kinds(check(narrowed, settings)) == {"manifest_unsigned"}

    forger = Signer(nacl.signing.SigningKey.generate())
    (narrowed / MANIFEST_FILE).write_text(json.dumps(sign_manifest(manifest, forger)))
    report = check(narrowed, settings)
    assert kinds(report) == {"manifest_untrusted_key"}
    assert forger.public_key in report.findings[0].describe()

    # The genuine bundle, checked with a key that is not its exporter's: a fresh one, another installation's.
    fresh = verify_bundle(original, trusted(keys_file(settings)), TrustedKeys([forger.public_key]))
    assert kinds(fresh) == {"manifest_untrusted_key"}
    other = CredentialStore(tmp_path / "other-installation", "other")
    other.ensure_installation()
    result = await run_warden_cli(
        settings,
        "audit",
        "verify",
        "--bundle",
        str(original),
        "--keys",
        str(keys_file(settings)),
        "--export-keys",
        str(other.directory / EVIDENCE_KEYS_FILE),
    )
    assert result.status == AUDIT_NOT_INTACT, result.stdout + result.stderr
    assert "manifest_untrusted_key" in result.stdout
    assert "NOT INTACT" in result.stdout


async def test_an_export_without_an_evidence_key_is_one_clear_line(settings: Settings) -> None:
    """An installation from before bundles were signed: the export says how to make the key, exit 2, no traceback."""
    settings.evidence_key_path().unlink()
    result = await run_warden_cli(settings, "audit", "export", "--tenant", "acme", "--out", "/nonexistent/bundle")
    assert result.status == USAGE_ERROR, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"warden: no evidence key {settings.evidence_key_path()}")
    assert f"warden credentials init --dir {settings.evidence_key_path().parent}" in line


def test_a_manifest_signature_holds_for_what_was_signed_only(tmp_path: Path) -> None:
    """Signed over the canonical JSON of the manifest without its signature (checkable with any Ed25519 tool);
    any change to the manifest, or a malformed signature, is refused."""
    exporter = Signer(nacl.signing.SigningKey.generate())
    checkpoints = TrustedKeys([Signer(nacl.signing.SigningKey.generate()).public_key])
    bundle = tmp_path / "bundle"
    manifest = write_bundle(bundle, Scope("acme"), [], [], {}, signer=exporter, exported_at=datetime.now(UTC))
    assert json.loads((bundle / MANIFEST_FILE).read_text()) == manifest
    report = verify_bundle(bundle, checkpoints, TrustedKeys([exporter.public_key]))
    assert report.intact, report.as_json()
    assert report.signed_by == exporter.public_key

    signature = manifest["signature"]
    assert signature["key"] == exporter.public_key
    unsigned = {name: value for name, value in manifest.items() if name != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert manifest_signed_bytes(manifest) == canonical
    nacl.signing.VerifyKey(base64.b64decode(signature["key"])).verify(canonical, base64.b64decode(signature["value"]))

    changes: list[Callable[[dict[str, Any]], object]] = [
        lambda m: m["scope"].update(run_id="r1"),
        lambda m: m["notes"].append("added"),
        lambda m: m.update(exported_at="2020-01-01T00:00:00+00:00"),
        lambda m: m["signature"].update(value=base64.b64encode(bytes(64)).decode()),
        lambda m: m["signature"].update(value="not base64!"),
        lambda m: m.update(signature="a string"),
    ]
    for change in changes:
        changed = json.loads(json.dumps(manifest))
        change(changed)
        (bundle / MANIFEST_FILE).write_text(json.dumps(changed))
        report = verify_bundle(bundle, checkpoints, TrustedKeys([exporter.public_key]))
        assert kinds(report) == {"manifest_bad_signature"}, report.as_json()
        assert report.signed_by is None

    # Only the top manifest is the manifest: a file of that name anywhere else is one the manifest does not list.
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    (bundle / "extra").mkdir()
    (bundle / "extra" / MANIFEST_FILE).write_text("{}")
    report = verify_bundle(bundle, checkpoints, TrustedKeys([exporter.public_key]))
    assert [finding.describe() for finding in report.findings] == [
        "extra/manifest.json: not listed in the manifest: added"
    ]


@pytest.mark.parametrize("options", [("--tenant", "no.such"), ("--tenant", "acme", "--since", "yesterday-ish")])
async def test_a_bad_export_request_is_one_clear_line(settings: Settings, options: tuple[str, ...]) -> None:
    """An invalid tenant or time is refused at once with one line and exit 2, no traceback."""
    result = await run_warden_cli(settings, "audit", "export", *options)
    assert result.status == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("warden: ")
