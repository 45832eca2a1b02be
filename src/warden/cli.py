"""The `warden` command: run the embedded stack, submit commands, tail events, replay the audit.

`submit` and `tail` need only the client (nats-py and pydantic), so they work on a client-only
install; every other command imports what it needs when it runs, and says which extra to install
when that is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import nats
from pydantic import ValidationError

from warden.client import TailedEvent, WardenClient
from warden.database import DatabaseRole
from warden.endpoints import NoStack
from warden.errors import WardenError
from warden.messages import describe_validation_error

if TYPE_CHECKING:
    import asyncpg

    from warden.settings import Settings
    from warden.signing import Signer

# `warden audit replay` exits with this status when streams had holes: the history it rebuilt is incomplete.
REPLAY_FOUND_GAPS = 3
# `warden policy replay` exits with this status when a candidate bundle flips a recorded decision's effect.
POLICY_REPLAY_FLIPS = 7
# `warden audit verify` exits with this status when the audit is not intact: a row changed, missing,
# inserted or moved, rows cut off, a checkpoint refused, or a row that is not its stored message.
AUDIT_NOT_INTACT = 6
# `warden provision` exits with this status when it left a change undone that would weaken a stream.
PROVISION_REFUSED = 4
# The commands a client-only install can run: they need nothing but the client, which finds the
# stack itself (WardenClient.connect_to_stack).
CLIENT_COMMANDS = frozenset({"submit", "tail", "approvals", "approve", "reject", "cancel", "halt", "resume", "halts"})
# The other commands that talk to a running stack (or to the servers WARDEN_NATS_URL names).
STACK_COMMANDS = frozenset({"provision", "runs", "dead-letters", "audit"})
# What to install for the other commands, when a client-only install is asked for one.
STACK_EXTRA = "warden-control-plane[stack]"
# The exit status when a command needs what this install lacks.
MISSING_EXTRA = 5
# A command line that cannot be carried out as given (bad JSON, an invalid tenant).
USAGE_ERROR = 2
# How the CLI connects: a dead or wrong address is a clear error within seconds, not minutes of
# reconnect attempts (`warden provision`, which waits for a cluster on purpose, excepted).
CLI_CONNECT_OPTIONS: dict[str, Any] = {"connect_timeout": 2.0, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.5}


class UsageError(WardenError):
    """The command line asks for something that cannot be done as given."""


async def _quiet(_: Exception) -> None:
    """nats-py's error callback: connection errors reach the CLI as exceptions, said once."""


async def _client(args: argparse.Namespace) -> WardenClient:
    return await WardenClient.connect_to_stack(error_cb=_quiet, **CLI_CONNECT_OPTIONS)


def _settings(args: argparse.Namespace) -> Settings:
    from warden.settings import Settings, settings_for_running_stack  # noqa: PLC0415

    overrides: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        overrides["state_dir"] = Path(args.state_dir)
    settings = Settings(**overrides)
    # Only the commands that talk to a stack look for one; `policy test` and `schemas` work anywhere.
    offline = getattr(args, "bundle", None) is not None  # `audit verify --bundle` checks files only
    return settings_for_running_stack(settings) if args.command in STACK_COMMANDS and not offline else settings


async def _up(args: argparse.Namespace, settings: Settings) -> int:
    from warden.stack import run_stack  # noqa: PLC0415

    await run_stack(_with_replicas(args, settings), sync=args.sync, nats_nodes=args.cluster)
    return 0


def _with_replicas(args: argparse.Namespace, settings: Settings) -> Settings:
    """`--replicas`, else three on a `--cluster 3` of `warden up`, else WARDEN_STREAM_REPLICAS."""
    replicas = args.replicas or (3 if getattr(args, "cluster", 1) == 3 else None)
    return settings.model_copy(update={"stream_replicas": replicas}) if replicas else settings


async def _demo(_: argparse.Namespace, settings: Settings) -> int:
    from warden.demo import run_demo  # noqa: PLC0415

    await run_demo(settings)
    return 0


async def _reader(settings: Settings) -> asyncpg.Connection:
    """The audit database, as its read-only role."""
    import asyncpg  # noqa: PLC0415

    try:
        return await asyncpg.connect(settings.database_url_for(DatabaseRole.READER), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise NoStack(f"cannot reach Postgres ({exc}); is the stack running (`warden up`)?") from exc


async def _runs(args: argparse.Namespace, settings: Settings) -> int:
    from warden import read_model  # noqa: PLC0415
    from warden.timeline import run_timeline, trusted_keys  # noqa: PLC0415

    db = await _reader(settings)
    try:
        if args.run:
            tenant = await read_model.tenant_of_run(db, args.run)
            if tenant is None:
                raise UsageError(f"no run {args.run!r} in the audit tables (is it still being projected?)")
            for line in await run_timeline(db, tenant, args.run, trusted_keys(settings)):
                print(line)
            return 0
        runs = await read_model.recent_runs(db, args.tenant, args.limit)
        rejected = await read_model.recent_rejections(db, args.tenant, args.limit)
    finally:
        await db.close()
    print(
        f"{'run':<38} {'tenant':<10} {'agent':<12} {'status':<11} {'by':<8} turns tools {'tokens':>7} "
        f"{'cost USD':>10} submitted"
    )
    for run in runs:
        print(
            f"{run.run_id:<38} {run.tenant:<10} {run.agent or '-':<12} {run.status:<11} "
            f"{run.submitted_by or '-':<8} {run.model_turns:>5} {run.tool_calls:>5} {run.tokens:>7} "
            f"{run.cost_usd:>10.6f} {run.submitted_at}"
        )
    if rejected:
        print("\nrejected commands (kept in the commands stream, never acted on):")
        for command in rejected:
            print(
                f"  command {command.command_stream_seq:<6} {command.tenant:<12} {command.code}: {command.reason[:160]}"
            )
    return 0


async def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from warden import read_model  # noqa: PLC0415
    from warden.streams import StreamNames  # noqa: PLC0415

    names = StreamNames.for_prefix(settings.subject_prefix)
    # A short name means this installation's stream of that kind; anything else is a stream's own name.
    stream = {"commands": names.commands, "events": names.events, "work": names.work}.get(args.stream, args.stream)
    db = await _reader(settings)
    try:
        letters = await read_model.dead_letters(db, stream, args.limit)
    finally:
        await db.close()
    if args.json:
        for letter in letters:
            record = {
                "stream": letter.stream,
                "stream_seq": letter.stream_seq,
                "consumer": letter.consumer,
                "reason": letter.reason,
                "deliveries": letter.deliveries,
                "recorded_at": letter.recorded_at.isoformat() if letter.recorded_at else None,
                "subject": letter.subject,
                "raw_base64": base64.b64encode(letter.raw).decode() if letter.raw is not None else None,
                "raw_note": letter.raw_note,
            }
            print(json.dumps(record))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(f"{'stream':<24} {'seq':>8} {'consumer':<16} {'tries':>5} {'given up at':<32} reason")
    for letter in letters:
        tries = "-" if letter.deliveries is None else str(letter.deliveries)
        print(
            f"{letter.stream:<24} {letter.stream_seq:>8} {letter.consumer:<16} {tries:>5} "
            f"{letter.recorded_at or '-'!s:<32} {letter.reason}"
        )
        # repr() of the bytes: whatever a sender put in them, nothing reaches the terminal unescaped.
        kept = f"{len(letter.raw)} bytes {letter.raw[:120]!r}" if letter.raw is not None else letter.raw_note
        print(f"  {letter.subject or '-'}: {kept}")
    return 0


def _credentials_directory(given: str | None, settings: Settings) -> Path:
    """The credentials directory a command works on: --dir, else WARDEN_NATS_CREDENTIALS_DIR, else the
    stack's `<state dir>/credentials`."""
    from warden.endpoints import credentials_dir  # noqa: PLC0415

    return Path(given) if given else settings.nats_credentials_dir or credentials_dir(settings.state_dir)


async def _credentials(args: argparse.Namespace, settings: Settings) -> int:
    from warden.credentials import AUTHORIZATION_FILE, CredentialStore, write_authorization  # noqa: PLC0415
    from warden.endpoints import credentials_dir  # noqa: PLC0415

    state_dir = settings.state_dir.resolve()
    store = CredentialStore(_credentials_directory(args.dir, settings).resolve(), settings.subject_prefix)
    match args.credentials_command:
        case "list":
            for identity in store.identities():
                print(f"{identity.description:<32} {identity.public_key}  {identity.seed_file}")
            return 0
        case "init":
            for identity in store.ensure_installation():
                print(f"{identity.description:<32} {identity.seed_file}")
        case "issue":
            identity = store.issue(args.tenant, args.actor)
            print(f"issued: {identity.description}")
            print(f"credential: {identity.seed_file}")
            print("It is a secret: whoever holds it acts for this actor of this tenant, and no one else's.")
            print(f"Use it: WARDEN_NATS_SEED_FILE={identity.seed_file} warden submit --tenant {args.tenant} ...")
        case "revoke":
            identity = store.revoke(args.tenant, args.actor)
            print(f"revoked: {identity.description} ({identity.public_key})")
    # The server's list of identities: the embedded stack's, when these are its credentials (and
    # a running one reloads it now); otherwise a file for whoever runs the NATS server.
    embedded_config = state_dir / "nats-config"
    if embedded_config.is_dir() and store.directory == credentials_dir(state_dir):
        from warden.embedded import apply_credentials  # noqa: PLC0415

        if reloaded := await apply_credentials(state_dir, store):
            print(f"NATS: the running stack's server(s) ({reloaded}) now accept exactly these identities")
        else:
            print("NATS: the stack is not running; it will accept these identities when `warden up` starts it")
    else:
        target = store.directory / AUTHORIZATION_FILE
        write_authorization(target, [store])
        print(f"NATS: include {target} in the server's configuration, then reload it (nats-server --signal reload)")
    return 0


async def _credentials_hand_out(args: argparse.Namespace, settings: Settings) -> int:
    from warden.credentials import hand_out  # noqa: PLC0415

    directory = _credentials_directory(args.dir, settings)
    # Copies of what is there, so no server's list of identities changes: nothing to reload.
    for role, private in hand_out(directory.resolve(), Path(args.into)).items():
        print(f"{role.value:<32} {private}: {', '.join(sorted(path.name for path in private.iterdir()))}")
    return 0


async def _database_install(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg  # noqa: PLC0415

    from warden.audit_projector.install import install_database  # noqa: PLC0415
    from warden.database import (  # noqa: PLC0415
        DatabaseRole,
        database_name,
        password_file,
        read_password,
        redacted,
        role_name,
        with_login,
    )

    admin_url = args.admin_url or os.environ.get("WARDEN_DATABASE_ADMIN_URL")
    if not admin_url:
        raise UsageError("an administrator's login is needed: --admin-url or WARDEN_DATABASE_ADMIN_URL")
    if args.admin_password_file:
        parts = urlsplit(admin_url)
        admin_url = with_login(admin_url, parts.username or "postgres", read_password(Path(args.admin_password_file)))
    directory = _credentials_directory(args.dir, settings)
    try:
        await install_database(admin_url, settings.database_url, directory.resolve(), settings.subject_prefix)
    except asyncpg.PostgresError as exc:  # a wrong password, a login without the rights: said, not traced back
        raise WardenError(f"Postgres refused the installation ({type(exc).__name__}): {exc}") from None
    database = database_name(settings.database_url)
    print(f"installed: {redacted(settings.database_url)}")
    for role in DatabaseRole:
        print(f"  {role_name(database, role):<32} password in {password_file(directory.resolve(), role)}")
    print("Services log in as their role with WARDEN_DATABASE_URL (no user in it) and WARDEN_NATS_CREDENTIALS_DIR.")
    return 0


async def _policy_test(args: argparse.Namespace, settings: Settings) -> int:
    from warden.policy_gate.engine import SHIPPED_POLICY_DIR  # noqa: PLC0415
    from warden.policy_gate.policy_tests import policy_test_command  # noqa: PLC0415

    return policy_test_command(Path(args.directory) if args.directory else settings.policy_dir or SHIPPED_POLICY_DIR)


async def _policy_change(args: argparse.Namespace, settings: Settings) -> int:
    """`warden policy shadow`, `promote` and `rollback`: send the change, wait for the gate's decision, print it."""
    from warden.policy_bundle import PolicyBundle  # noqa: PLC0415

    change = args.policy_command
    revision = None
    async with await _client(args) as client:
        if change == "shadow":
            bundle = PolicyBundle.read(Path(args.directory))
            revision = bundle.revision
            done = await client.shadow_policy(bundle, actor=args.actor, reason=args.reason, wait_seconds=args.wait)
        elif change == "promote":
            revision = args.revision
            done = await client.promote_policy(
                actor=args.actor, revision=args.revision, reason=args.reason, wait_seconds=args.wait
            )
        elif change == "withdraw":
            revision = args.revision
            done = await client.withdraw_policy(
                actor=args.actor, revision=args.revision, reason=args.reason, wait_seconds=args.wait
            )
        else:
            done = await client.rollback_policy(actor=args.actor, reason=args.reason, wait_seconds=args.wait)
    print(
        json.dumps(
            {
                "change": change,
                "revision": revision,
                "actor": args.actor,
                "command_id": done.receipt.command_id,
                "decision": done.effect,
                "decision_id": done.decision_id,
                "reasons": done.reasons,
            }
        )
    )
    return 0 if done.in_force else 1


async def _policy_status(args: argparse.Namespace, settings: Settings) -> int:
    async with await _client(args) as client:
        status = await client.policy_status()
    if args.json:
        print(json.dumps(dataclasses.asdict(status)))
        return 0
    print(f"active:      {status.active or '(no gate has recorded one)'}")
    print(f"shadow:      {status.shadow or '(none)'}")
    print(f"rollback to: {status.rollback_to or '(nothing: no promote to undo)'}")
    for change in status.changes:
        when, what, revision = change["time"][:19], change["change"], change["revision"]
        print(f"  {when}  {what:<8} {revision}  by {change['by']}  {change['reason']}")
    return 0


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO 8601 date or time (UTC unless it says otherwise), or an age such as 30m, 12h, 7d."""
    now = now or datetime.now(UTC)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    if text[-1:] in units and text[:-1].isdigit():
        return now - timedelta(seconds=int(text[:-1]) * units[text[-1]])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: give an ISO 8601 time (2026-11-30T12:00Z) or an age (30m, 12h, 7d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def _policy_replay(args: argparse.Namespace, settings: Settings) -> int:
    from warden.decision_history import read_decision_events  # noqa: PLC0415
    from warden.policy_gate.policy_replay import PolicyReplay  # noqa: PLC0415

    since = parse_since(args.since) if args.since else None
    candidate = Path(args.candidate)

    last_said = 0.0

    def progress(replayed: int, read: int) -> None:
        nonlocal last_said
        if not args.quiet and time.monotonic() - last_said >= 1.0:
            last_said = time.monotonic()
            print(f"warden: {replayed} of {read} decisions read so far replayed", file=sys.stderr, flush=True)

    # Each decision goes to the candidate's judges as it is read: reading and judging overlap.
    with PolicyReplay(candidate, workers=args.workers, progress=progress) as replay:
        async with await _client(args) as client:
            await read_decision_events(
                client.nc, client.subjects.prefix, replay.add, tenant=args.tenant, since=since, progress=replay.reading
            )
        report = replay.finish()
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        _print_policy_replay(report, args.limit)
    if report.unreadable:
        print(f"warden: {report.unreadable} message(s) on decision subjects were not decisions", file=sys.stderr)
    return POLICY_REPLAY_FLIPS if report.effect_flips else 0


def _print_policy_replay(report: Any, limit: int) -> None:
    print(
        f"candidate {report.candidate_revision}: {report.replayed} decisions replayed in {report.seconds:.2f} s "
        f"({report.decisions_per_second:,.0f}/s): {report.unchanged} unchanged, "
        f"{len(report.effect_flips)} effect flips, {len(report.reason_changes)} with other reasons"
        + (f"; {report.without_input} recorded without their input (not replayed)" if report.without_input else "")
    )
    for transition, count in sorted(report.transitions().items()):
        print(f"  {transition}: {count}")
    if not report.flips:
        return
    shown = sorted(report.flips, key=lambda flip: (not flip.effect_flipped, flip.recorded.stream_seq))[:limit]
    # As wide as the longest shown, so that a run id of any length keeps the columns after it in line.
    tenant_width = max(len("tenant"), *(len(flip.recorded.tenant) for flip in shown))
    run_width = max(len("run"), *(len(flip.recorded.run_id) for flip in shown))
    print(
        f"{'time':<27} {'tenant':<{tenant_width}} {'run':<{run_width}} {'request':<20} {'recorded':<17} "
        f"{'candidate':<17} reasons now"
    )
    for flip in shown:
        recorded = flip.recorded
        now_reasons = "; ".join(reason for reason in flip.reasons if reason not in recorded.reasons) or "(fewer)"
        print(
            f"{recorded.time[:26]:<27} {recorded.tenant:<{tenant_width}} {recorded.run_id:<{run_width}} "
            f"{recorded.request_type:<20} {recorded.effect:<17} {flip.effect:<17} {now_reasons}"
        )
    if len(report.flips) > limit:
        print(f"... and {len(report.flips) - limit} more (--limit, or --json for all)")


async def _provision(args: argparse.Namespace, settings: Settings) -> int:
    from warden.bus import retry_transient  # noqa: PLC0415
    from warden.identity import connect_options  # noqa: PLC0415
    from warden.permissions import Role  # noqa: PLC0415
    from warden.streams import provision  # noqa: PLC0415
    from warden.subjects import Subjects  # noqa: PLC0415
    from warden.wire import connect  # noqa: PLC0415

    settings = _with_replicas(args, settings)
    # A cluster may still be electing its leaders (or its nodes starting): wait for it a while.
    nc = await connect(
        settings.nats_url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1.0,
        **connect_options(settings.seed_file_for(Role.PROVISIONER)),
    )
    try:
        result = await retry_transient(
            lambda: provision(
                nc.jetstream(), Subjects(settings.subject_prefix), settings.stream_replicas, force=args.force
            ),
            what="provisioning",
        )
    finally:
        await nc.close()
    print("\n".join(result.lines()) or "streams already as declared")
    return PROVISION_REFUSED if result.refused else 0


async def _submit(args: argparse.Namespace) -> int:
    try:
        run_input = json.loads(args.input) if args.input else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not JSON: {exc}") from None
    if not isinstance(run_input, dict):
        raise UsageError("--input must be a JSON object")
    async with await _client(args) as client:
        try:
            receipt = await client.submit_run(
                tenant=args.tenant,
                agent=args.agent,
                actor=args.actor,
                input=run_input,
                run_id=args.run_id,
                priority=args.priority,
                timeout_seconds=args.timeout,
                idempotency_key=args.idempotency_key,
            )
        except ValidationError as exc:
            raise UsageError(f"invalid submission: {describe_validation_error(exc)}") from None
        printed: dict[str, Any] = {
            "run_id": receipt.run_id,
            "command_id": receipt.command_id,
            "stream_seq": receipt.stream_seq,
            "duplicate": receipt.duplicate,
        }
        if args.wait is not None:
            outcome = await client.outcome(args.tenant, receipt, args.wait)
            printed["outcome"] = {"status": outcome.status, "reasons": outcome.reasons}
    print(json.dumps(printed))
    return 0 if args.wait is None or printed["outcome"]["status"] == "succeeded" else 1


def _tail_line(event: TailedEvent) -> str:
    if event.envelope is None:
        return json.dumps({"stream_seq": event.stream_seq, "subject": event.nats_subject, "invalid": event.error})
    document = json.loads(event.envelope.to_bytes())
    return json.dumps({"stream_seq": event.stream_seq, **document})


async def _approvals(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        requests = await client.approval_requests(args.tenant, pending_only=not args.all)
    if args.json:
        for found in requests:
            document = found.request.model_dump(mode="json", exclude={"decision"})
            print(json.dumps({"status": found.status, "run_id": found.run_id, **document}))
        return 0
    if not requests:
        print(f"no {'' if args.all else 'pending '}approval requests in tenant {args.tenant}")
        return 0
    print(f"{'approval':<28} {'status':<9} {'run':<28} {'tool':<16} {'asked by':<10} {'approvers':<16} expires")
    for found in requests:
        request = found.request
        print(
            f"{request.approval_id:<28} {found.status:<9} {found.run_id:<28} {request.tool:<16} "
            f"{request.requested_by:<10} {','.join(request.approver_roles):<16} {request.expires_at:%Y-%m-%d %H:%M:%S}"
        )
        print(f"    arguments {json.dumps(request.arguments)}; why: {'; '.join(request.reasons)}")
    return 0


async def _answer(args: argparse.Namespace) -> int:
    approve = args.command == "approve"
    async with await _client(args) as client:
        answered = await client.answer_approval(
            tenant=args.tenant,
            approval_id=args.approval_id,
            actor=args.actor,
            approve=approve,
            reason=args.reason or "",
            wait_seconds=args.wait,
        )
    print(
        json.dumps(
            {
                "approval_id": args.approval_id,
                "answer": args.command,
                "command_id": answered.receipt.command_id,
                "duplicate": answered.receipt.duplicate,
                "counted": answered.counted,
                "decision": answered.effect,
                "reasons": answered.reasons,
            }
        )
    )
    return 0 if answered.counted else 1


async def _control(args: argparse.Namespace) -> int:
    """`warden cancel`, `halt` and `resume`: send the command, wait for the gate's decision, print it."""
    async with await _client(args) as client:
        if args.command == "cancel":
            done = await client.cancel_run(
                tenant=args.tenant,
                run_id=args.run_id,
                actor=args.actor,
                reason=args.reason or "",
                wait_seconds=args.wait,
            )
        elif args.command == "halt":
            done = await client.halt(
                tenant=args.tenant, agent=args.agent, actor=args.actor, reason=args.reason, wait_seconds=args.wait
            )
        else:
            done = await client.lift_halt(
                tenant=args.tenant, agent=args.agent, actor=args.actor, reason=args.reason or "", wait_seconds=args.wait
            )
    print(
        json.dumps(
            {
                "command": args.command,
                "tenant": args.tenant,
                **({"run_id": args.run_id} if args.command == "cancel" else {"agent": args.agent}),
                "command_id": done.receipt.command_id,
                "duplicate": done.receipt.duplicate,
                "decision": done.effect,
                "decision_id": done.decision_id,
                "decided_at": done.decided_at.isoformat() if done.decided_at else None,
                "reasons": done.reasons,
            }
        )
    )
    return 0 if done.in_force else 1


async def _halts(args: argparse.Namespace) -> int:
    async with await _client(args) as client:
        halts = await client.halts(args.tenant)
    for scope, control in sorted(halts.items()):
        print(
            json.dumps(
                {
                    "scope": scope,
                    "decision_id": control.decision_id,
                    "reason": control.reason,
                    "since": control.decided_at.isoformat(),
                }
            )
        )
    if not halts and not args.json:
        print(f"no halt in force in tenant {args.tenant}", file=sys.stderr)
    return 0


async def _tail(args: argparse.Namespace) -> int:
    async with (
        await _client(args) as client,
        # Closed before the client: a reader gone early (`| head`) must not leave a consumer behind.
        contextlib.aclosing(
            client.tail(args.tenant, args.run, from_start=not args.from_now, idle_timeout=args.idle_timeout)
        ) as events,
    ):
        async for event in events:
            print(_tail_line(event), flush=True)
    return 0


async def _audit_access(args: argparse.Namespace, settings: Settings) -> int:
    from warden.access import read_access  # noqa: PLC0415
    from warden.credentials import CredentialStore  # noqa: PLC0415
    from warden.permissions import Role  # noqa: PLC0415
    from warden.streams import StreamNames  # noqa: PLC0415

    names: dict[str, tuple[str, Role]] = {}
    if settings.nats_credentials_dir is not None:
        store = CredentialStore(settings.nats_credentials_dir, settings.subject_prefix)
        names = {identity.public_key: (identity.description, identity.role) for identity in store.identities()}
    readers = {Role.OPERATOR, Role.TENANT}
    async with await _client(args) as client:
        accesses = await read_access(client.nc, StreamNames.for_prefix(settings.subject_prefix))
    for access in accesses:
        who, role = names.get(access.public_key or "", (access.public_key or "(unnamed)", None))
        if not args.all and role is not None and role not in readers:
            continue  # the installation's own services at their work
        record = {
            "time": access.time.isoformat(),
            "identity": who,
            "public_key": access.public_key,
            "request": access.request_subject,
            "filter": list(access.filter_subjects),
        }
        print(json.dumps(record))
    return 0


async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from warden.audit_projector.replay import replay  # noqa: PLC0415 (keeps asyncpg off the CLI's fast paths)

    schema = args.schema or f"replay_{datetime.now(UTC):%Y%m%d_%H%M%S}"
    report = await replay(settings, schema, args.database_url)
    print(
        json.dumps(
            {
                "schema": report.schema,
                "events_applied": report.events_applied,
                "per_stream": report.per_stream,
                "seconds": round(report.seconds, 3),
                "events_per_second": round(report.events_per_second),
                "missing": [{"stream": s, "first_seq": first, "last_seq": last} for s, first, last in report.gaps],
            }
        )
    )
    for stream, first, last in report.gaps:
        print(f"warden: {stream} is missing sequences {first}..{last} (deleted or purged)", file=sys.stderr)
    if report.gaps:
        print(
            f"warden: the replayed history in {schema!r} has {len(report.gaps)} hole(s); it is not the whole record",
            file=sys.stderr,
        )
        return REPLAY_FOUND_GAPS
    return 0


async def _audit_export(args: argparse.Namespace, settings: Settings) -> int:
    from warden.audit_projector.export import export_evidence  # noqa: PLC0415
    from warden.evidence import Scope  # noqa: PLC0415
    from warden.subjects import Subjects  # noqa: PLC0415

    try:
        Subjects(settings.subject_prefix).decisions(args.tenant)  # a tenant is a subject token
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    since = parse_since(args.since) if args.since else None
    scope = Scope(tenant=args.tenant, run_id=args.run, since=since)
    signer = _evidence_signer(settings)
    directory = _new_bundle_directory(args)

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"warden: {line}", file=sys.stderr, flush=True)

    database = await _reader(settings)
    try:
        async with await _client(args) as client:
            result = await export_evidence(
                client.nc, database, client.subjects.prefix, scope, directory, signer=signer, progress=progress
            )
    finally:
        await database.close()
    chains = result.manifest["chains"]
    print(
        f"evidence of tenant {args.tenant}"
        + (f", run {args.run}" if args.run else "")
        + (f", since {since.isoformat()}" if since else "")
        + f": {result.in_scope} rows in scope ({result.rows} in {len(chains)} chains), "
        f"{result.checkpoints} checkpoints, {len(result.manifest['policy_revisions'])} policy bundles, in {directory}/"
    )
    print(f"manifest signed with the evidence key {signer.public_key}")
    for note in result.manifest["notes"]:
        print(f"note: {note}")
    print(
        f"check it anywhere with: warden audit verify --bundle {directory} "
        "--keys <checkpoint-keys.pub> --export-keys <evidence-keys.pub>"
    )
    return 0


def _evidence_signer(settings: Settings) -> Signer:
    """The operator's evidence key, which signs the bundle's manifest: read before anything is gathered,
    so that an installation without one is told at once how to make it."""
    from warden.signing import Signer, SigningKeyError  # noqa: PLC0415

    try:
        path = settings.evidence_key_path()
    except SigningKeyError as exc:
        raise UsageError(str(exc)) from exc
    if not path.exists():
        if settings.evidence_signing_key_file is not None:
            raise UsageError(
                f"no evidence key {path} (WARDEN_EVIDENCE_SIGNING_KEY_FILE): the manifest is signed with it"
            )
        # An installation made before bundles were signed has none until its credentials are brought up to date.
        raise UsageError(
            f"no evidence key {path}: the manifest is signed with it; create it with "
            f"`warden credentials init --dir {path.parent}` (`warden up` also does on its next start)"
        )
    return Signer.from_file(path, "evidence signing key")


def _new_bundle_directory(args: argparse.Namespace) -> Path:
    """Where `audit export` writes: --out, or a name of its own; never over what is there."""
    directory = Path(args.out or f"evidence-{args.tenant}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory} is not empty: give --out a new directory")
    return directory


def _bundle_keys(given: str | Path | None, settings: Settings, name: str, option: str, what: str) -> Path:
    """The public keys a bundle is checked with: `given` (the option's file, else the one its WARDEN_*
    variable names), else the local installation's `name`."""
    if given:
        return Path(given)
    local = _credentials_directory(None, settings) / name
    if not local.is_file():
        raise UsageError(f"give {option} FILE: the {what} public keys ({name}) to check the bundle with")
    return local


async def _audit_verify_bundle(args: argparse.Namespace, settings: Settings) -> int:
    from warden.evidence import verify_bundle  # noqa: PLC0415
    from warden.signing import CHECKPOINT_KEYS_FILE, EVIDENCE_KEYS_FILE, TrustedKeys  # noqa: PLC0415

    keys = _bundle_keys(
        args.keys or settings.checkpoint_keys_file, settings, CHECKPOINT_KEYS_FILE, "--keys", "checkpoint"
    )
    export_keys = _bundle_keys(
        args.export_keys or settings.evidence_keys_file, settings, EVIDENCE_KEYS_FILE, "--export-keys", "evidence"
    )
    report = verify_bundle(
        Path(args.bundle),
        TrustedKeys(TrustedKeys.read(keys, "checkpoint"), "checkpoint"),
        TrustedKeys(TrustedKeys.read(export_keys, "evidence"), "evidence"),
    )
    if args.json:
        print(json.dumps(report.as_json()))
        return 0 if report.intact else AUDIT_NOT_INTACT
    for finding in report.findings:
        print(f"{finding.kind}: {finding.describe()}")
    scope = report.scope
    print(
        f"{'intact' if report.intact else 'NOT INTACT'}: bundle of tenant {scope.get('tenant')}"
        + (f", run {scope['run_id']}" if scope.get("run_id") else "")
        + f": {report.in_scope} rows in scope of {report.rows}, {report.decisions} decisions, "
        f"{report.checkpoints} checkpoints verified with {keys}, {report.policy_revisions} policy bundles, "
        f"{len(report.findings)} finding(s)"
    )
    if report.signed_by is not None:
        print(f"manifest signed with the evidence key {report.signed_by}, trusted in {export_keys}")
    if report.unanchored:
        # No checkpoint covers them: the exporter's signature on the manifest (if it holds) is all there is.
        vouched = "only the exporter's signature, not the projector's," if report.signed_by else "no signature"
        print(
            f"note: {report.unanchored} row(s) come after the last checkpoint in the bundle: intact as far as the "
            f"chain shows, but {vouched} vouches for them"
        )
    if report.unrecorded_revisions:
        unrecorded = ", ".join(report.unrecorded_revisions)
        print(f"note: policy revisions never recorded (decided before gates recorded their bundles): {unrecorded}")
    return 0 if report.intact else AUDIT_NOT_INTACT


async def _audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    if args.bundle is not None:
        return await _audit_verify_bundle(args, settings)
    from warden.audit_projector.verify import verify  # noqa: PLC0415 (keeps asyncpg off the CLI's fast paths)

    def progress(line: str) -> None:
        print(f"warden: {line}", file=sys.stderr, flush=True)

    database = await _reader(settings)
    try:
        report = await verify(
            settings, database, skip_stream=args.skip_stream, progress=None if args.quiet else progress
        )
    finally:
        await database.close()
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        for finding in report.findings:
            print(f"{finding.kind}: {finding.stream} / {finding.tenant}: {finding.describe()}")
        checked = "not compared with the streams" if args.skip_stream else f"{report.messages} stream messages compared"
        print(
            f"{'intact' if report.intact else 'NOT INTACT'}: {report.rows} rows in {len(report.chains)} chains, "
            f"{report.checkpoints} checkpoints, {checked}, {len(report.findings)} finding(s) "
            f"in {report.seconds:.1f} s"
        )
        if report.unanchored:
            print(
                f"note: {report.unanchored} row(s) come after their chain's last checkpoint: no signature covers "
                "them yet, so only the streams can show whether rows after them were cut off"
            )
        unchained = sum(chain.unchained for chain in report.chains)
        if unchained:
            print(f"note: {unchained} row(s) were stored before the audit was chained: not covered by any chain")
    return 0 if report.intact else AUDIT_NOT_INTACT


def _add_credentials_parser(commands: Any) -> None:
    credentials = commands.add_parser(
        "credentials", help="NATS identities: the installation's own, and tenants' client credentials"
    ).add_subparsers(dest="credentials_command", required=True)
    directory_help = "credentials directory (default: WARDEN_NATS_CREDENTIALS_DIR, else <state dir>/credentials)"
    state_dir_help = "the stack's state directory (default .warden, or WARDEN_STATE_DIR)"
    for name, help_text in (
        ("init", "create the installation's identities (provisioner, services, operator) where missing"),
        ("issue", "issue a tenant's client credential for one actor"),
        ("revoke", "revoke a tenant's client credential; NATS refuses it from its next reload"),
        ("list", "list the identities and where their seeds are"),
    ):
        command = credentials.add_parser(name, help=help_text)
        command.add_argument("--dir", help=directory_help)
        command.add_argument("--state-dir", help=state_dir_help)
        if name in ("issue", "revoke"):
            command.add_argument("--tenant", required=True)
            command.add_argument("--actor", required=True)
        command.set_defaults(handler=_credentials)
    hand_out = credentials.add_parser(
        "hand-out",
        help="give each service a directory of its own (under --into) holding only its seed and the keys or "
        "password it needs, as compose.yaml's containers get them; copies afresh: run it again after a change",
    )
    hand_out.add_argument("--dir", help=directory_help)
    hand_out.add_argument("--state-dir", help=state_dir_help)
    hand_out.add_argument(
        "--into",
        required=True,
        help="where the services' directories go: one per service role, named as `warden credentials list` "
        "names it (the operator and tenants get none); mode 700, files 600",
    )
    hand_out.set_defaults(handler=_credentials_hand_out)


def _add_audit_parser(commands: Any) -> None:
    audit = commands.add_parser("audit", help="audit trail tools").add_subparsers(dest="audit_command", required=True)
    replay = audit.add_parser(
        "replay",
        help="rebuild the projections from sequence 1 into a fresh schema; "
        f"exits {REPLAY_FOUND_GAPS} if messages are missing from a stream",
    )
    replay.add_argument("--schema", help="target schema (created; must be empty). Default: replay_<time>")
    replay.add_argument("--database-url", help="target database (default: WARDEN_DATABASE_URL)")
    replay.set_defaults(handler=_replay)
    verify = audit.add_parser(
        "verify",
        help="recompute the audit's hash chains and check them against the signed checkpoints and the streams; "
        f"exits {AUDIT_NOT_INTACT} if anything is found",
    )
    verify.add_argument("--json", action="store_true", help="the whole report as one JSON object")
    verify.add_argument("--skip-stream", action="store_true", help="do not compare the rows with the streams")
    verify.add_argument("--quiet", action="store_true", help="no progress on stderr")
    verify.add_argument(
        "--bundle", metavar="DIR", help="check an evidence bundle (warden audit export) offline instead: files only"
    )
    verify.add_argument(
        "--keys", metavar="FILE", help="with --bundle: the checkpoint public keys (default: this installation's)"
    )
    verify.add_argument(
        "--export-keys",
        metavar="FILE",
        help="with --bundle: the evidence public keys the manifest's signature is checked with "
        "(default: this installation's evidence-keys.pub)",
    )
    verify.set_defaults(handler=_audit_verify)
    export = audit.add_parser(
        "export",
        help="write a tenant's evidence (events, decisions with their inputs, approvals, policies, signed "
        "checkpoints) into a bundle, its manifest signed with the operator's evidence key, that anyone can check "
        "offline with `audit verify --bundle`",
    )
    export.add_argument("--tenant", required=True)
    export.add_argument("--run", help="only this run's rows (the others go in as hashes, so the chain still links)")
    export.add_argument("--since", help="rows stored from then on: an ISO 8601 time, or an age such as 30m, 12h, 7d")
    export.add_argument("--out", help="a new directory for the bundle (default: evidence-<tenant>-<time>)")
    export.add_argument("--quiet", action="store_true", help="no progress on stderr")
    export.set_defaults(handler=_audit_export)
    access = audit.add_parser(
        "access",
        help="who read this installation's streams (consumers created, lookups), as the NATS server recorded it",
    )
    access.add_argument("--all", action="store_true", help="the installation's own services too")
    access.set_defaults(handler=_audit_access)


def _add_policy_parser(commands: Any) -> None:
    policy = commands.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    policy_test = policy.add_parser("test", help="run the Rego unit tests (*_test.rego) and report")
    policy_test.add_argument("directory", nargs="?", help="policy directory (default: WARDEN_POLICY_DIR)")
    policy_test.set_defaults(handler=_policy_test)
    policy_replay = policy.add_parser(
        "replay",
        help="re-decide the recorded decisions on a candidate policy bundle and report those that would change; "
        f"exits {POLICY_REPLAY_FLIPS} if an effect flips",
    )
    policy_replay.add_argument("--candidate", required=True, help="the candidate policy directory")
    policy_replay.add_argument("--tenant", help="only this tenant's decisions (default: every tenant's)")
    policy_replay.add_argument("--since", help="only decisions from then on: an ISO 8601 time or an age (30m, 12h, 7d)")
    policy_replay.add_argument("--workers", type=int, help="evaluating processes (default: one per CPU, at most 8)")
    policy_replay.add_argument("--limit", type=int, default=50, help="flips to list (default 50)")
    policy_replay.add_argument("--json", action="store_true", help="the whole report, every flip, as one JSON object")
    policy_replay.add_argument("--quiet", action="store_true", help="no progress on stderr")
    policy_replay.set_defaults(handler=_policy_replay)
    changes = (
        (
            "shadow",
            "load a candidate bundle into every gate beside the one in force: each live decision is also "
            "judged on it, and each disagreement recorded (decision.shadowed), never enforced",
        ),
        ("promote", "put the shadow bundle in force in every gate, without a restart"),
        ("rollback", "put back in force the bundle that was in force before the last promote"),
        ("withdraw", "unload the shadow bundle from every gate without promoting it"),
    )
    for name, help_text in changes:
        change = policy.add_parser(name, help=f"{help_text}; exit 0 only if the gate allowed it")
        if name == "shadow":
            change.add_argument("directory", help="the candidate policy directory (its *.rego and data.json)")
        if name in ("promote", "withdraw"):
            change.add_argument("--revision", help=f"{name} only if the shadow is this revision")
        change.add_argument(
            "--actor",
            default="operator",
            help="who asks: a policy administrator of the tenant _warden (default operator)",
        )
        change.add_argument("--reason", default="", help="why (kept in the audit)")
        change.add_argument(
            "--wait", type=float, default=10.0, metavar="SECONDS", help="how long to wait for the decision"
        )
        change.set_defaults(handler=_policy_change)
    status = policy.add_parser("status", help="the bundle in force, the shadow, and the changes so far")
    status.add_argument("--json", action="store_true", help="as one JSON object")
    status.set_defaults(handler=_policy_status)


def _add_database_parser(commands: Any) -> None:
    database = commands.add_parser("database", help="the audit database").add_subparsers(
        dest="database_command", required=True
    )
    install = database.add_parser(
        "install",
        help="create the installation's roles (owner, projector, reader), its tables and grants; safe to repeat",
    )
    install.add_argument("--admin-url", help="a superuser's login to the server (default: WARDEN_DATABASE_ADMIN_URL)")
    install.add_argument("--admin-password-file", help="the administrator's password, read from this file")
    install.add_argument("--dir", help="where the roles' passwords go (default: the credentials directory)")
    install.set_defaults(handler=_database_install)


def _add_submit_parser(commands: Any) -> None:
    submit = commands.add_parser("submit", help="submit a run")
    submit.add_argument("--tenant", required=True)
    submit.add_argument("--agent", required=True)
    submit.add_argument("--actor", required=True, help="the principal asking for the run")
    submit.add_argument("--input", help="the run's input, a JSON object")
    submit.add_argument("--run-id")
    submit.add_argument("--priority", type=int, default=5)
    submit.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="the run's deadline, counted from now (the policy's deadline for the agent applies too: the stricter "
        "wins)",
    )
    submit.add_argument("--idempotency-key", help="sent as Nats-Msg-Id (default: derived from the run id)")
    submit.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for the outcome (rejected, denied, succeeded, failed) and print it; "
        "exit 0 only if the run succeeded",
    )
    submit.set_defaults(handler=_submit)


def _add_approval_parsers(commands: Any) -> None:
    approvals = commands.add_parser("approvals", help="list a tenant's tool calls awaiting approval")
    approvals.add_argument("--tenant", required=True)
    approvals.add_argument("--all", action="store_true", help="every request, answered and expired ones too")
    approvals.add_argument("--json", action="store_true", help="one JSON object per request")
    approvals.set_defaults(handler=_approvals)
    for verb, help_text in (("approve", "approve a tool call awaiting approval"), ("reject", "reject one")):
        answer = commands.add_parser(verb, help=help_text)
        answer.add_argument("approval_id", metavar="ID", help="as `warden approvals` lists it")
        answer.add_argument("--tenant", required=True)
        answer.add_argument(
            "--actor", required=True, help="who answers (a tenant's credential may answer only as its own actor)"
        )
        answer.add_argument("--reason", required=verb == "reject", help="why (kept in the audit)")
        answer.add_argument(
            "--wait",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the gate's decision on the answer (default 10); exit 0 only if it counted",
        )
        answer.set_defaults(handler=_answer)


def _add_control_parsers(commands: Any) -> None:
    wait_help = "how long to wait for the gate's decision (default 10); exit 0 only if it allowed the command"
    cancel = commands.add_parser("cancel", help="cancel a run: queued, it never starts; running, it ends cancelled")
    cancel.add_argument("run_id", metavar="RUN")
    halt = commands.add_parser("halt", help="halt every run of a tenant, or of one agent (the kill switch)")
    resume = commands.add_parser("resume", help="lift a halt: held runs go on")
    for parser in (cancel, halt, resume):
        parser.add_argument("--tenant", required=True)
        parser.add_argument("--actor", required=True, help="who asks (a tenant's credential: only its own actor)")
        parser.add_argument("--wait", type=float, default=10.0, metavar="SECONDS", help=wait_help)
        parser.set_defaults(handler=_control)
    for parser in (halt, resume):
        parser.add_argument("--agent", help="only this agent's runs (default: the whole tenant)")
    cancel.add_argument("--reason", help="why (kept in the audit and on the run)")
    halt.add_argument("--reason", required=True, help="why (kept in the audit and on every run it ends)")
    resume.add_argument("--reason", help="why (kept in the audit)")
    halts = commands.add_parser("halts", help="list a tenant's halts in force, one JSON object per line")
    halts.add_argument("--tenant", required=True)
    halts.add_argument("--json", action="store_true", help="print nothing but the JSON lines")
    halts.set_defaults(handler=_halts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="Policy-aware orchestration for AI agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run NATS, Postgres and every service here until Ctrl-C")
    up.add_argument("--state-dir", help="where the servers keep their data (default .warden, or WARDEN_STATE_DIR)")
    up.add_argument(
        "--sync",
        choices=["always", "interval"],
        default="always",
        help="JetStream durability: fsync every write (default) or every 2 minutes",
    )
    up.add_argument(
        "--cluster",
        type=int,
        choices=[1, 3],
        default=1,
        help="NATS nodes to run on loopback: 3 makes a JetStream cluster with R3 streams (default 1)",
    )
    up.add_argument(
        "--replicas", type=int, choices=range(1, 6), help="replicas per stream (default 1, or 3 on a cluster)"
    )
    up.set_defaults(handler=_up)

    demo = commands.add_parser("demo", help="start the embedded stack, run a governed agent, show its audit trail")
    demo.add_argument("--state-dir", help="where the servers keep their data (default .warden)")
    demo.set_defaults(handler=_demo)

    provisioning = commands.add_parser(
        "provision",
        help="create or update the JetStream streams; a change that would weaken one is refused "
        f"(exit {PROVISION_REFUSED}) unless --force",
    )
    provisioning.add_argument("--replicas", type=int, choices=range(1, 6), help="replicas per stream")
    provisioning.add_argument(
        "--force", action="store_true", help="apply changes that weaken a stream (fewer replicas, tighter limits)"
    )
    provisioning.set_defaults(handler=_provision)

    _add_database_parser(commands)
    _add_submit_parser(commands)

    tail = commands.add_parser("tail", help="print a tenant's (or one run's) events as JSON lines")
    tail.add_argument("--tenant", required=True)
    tail.add_argument("--run", help="only this run's events")
    tail.add_argument("--from-now", action="store_true", help="skip events stored before now")
    tail.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="stop after this many seconds without an event (default: follow until Ctrl-C)",
    )
    tail.set_defaults(handler=_tail)

    _add_credentials_parser(commands)
    _add_approval_parsers(commands)
    _add_control_parsers(commands)

    runs = commands.add_parser("runs", help="list runs from the audit tables, or show one run's timeline")
    runs.add_argument("--tenant")
    runs.add_argument("--run", help="print this run's timeline")
    runs.add_argument("--limit", type=int, default=20)
    runs.set_defaults(handler=_runs)

    dead = commands.add_parser(
        "dead-letters", help="list messages a consumer gave up on (max deliveries, terminated), newest first"
    )
    dead.add_argument(
        "--stream", help="only this stream's: commands, events, work, or a stream's name (default: every stream)"
    )
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--json", action="store_true", help="JSON lines, with the message's bytes in base64")
    dead.set_defaults(handler=_dead_letters)

    _add_policy_parser(commands)

    _add_audit_parser(commands)

    return parser


def _run_with_settings(args: argparse.Namespace) -> int:
    from warden.logging import configure_logging  # noqa: PLC0415

    settings = _settings(args)
    # The demo speaks to a person: the stack's own log lines (stream created, ...) would drown it.
    level = "WARNING" if args.command == "demo" else settings.log_level
    configure_logging("warden-cli", level, settings.log_format)
    return int(asyncio.run(args.handler(args, settings)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in CLIENT_COMMANDS:
            return int(asyncio.run(args.handler(args)))
        return _run_with_settings(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "warden").split(".")[0] == "warden":
            raise  # one of Warden's own modules: a broken install or a bug, not a missing extra
        print(
            f"warden: `warden {args.command}` needs {exc.name}, which this install lacks: pip install '{STACK_EXTRA}'",
            file=sys.stderr,
        )
        return MISSING_EXTRA
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`warden tail | head`): not an error, and nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except UsageError as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (WardenError, OSError, nats.errors.Error) as exc:
        print(f"warden: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
