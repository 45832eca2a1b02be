"""The security boundary on the bus, enforced by the real nats-server: who may connect, publish,
subscribe and call which JetStream API, per identity (see warden.permissions)."""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from tests.conftest import AppRunner, Servers, eventually, warden_cli
from warden.client import Receipt, WardenClient
from warden.credentials import CredentialStore
from warden.identity import CredentialError, connect_options, public_key, read_seed
from warden.messages import (
    CommandRejected,
    DecisionMade,
    PolicyChangeRequested,
    RunDispatched,
    RunStarted,
    RunSubmitted,
    StreamGapDetected,
    make_envelope,
)
from warden.permissions import GATE_CONSUMER, INSTALLATION_ROLES, PROJECTOR_CONSUMER, Role, inbox_prefix
from warden.policy_gate.app import build_app as build_gate
from warden.reader import FilteredReader
from warden.settings import Settings
from warden.streams import ACCESS_SUBJECT, TERMINATED_ADVISORY, StreamNames
from warden.subjects import Subjects


@pytest.fixture(autouse=True)
def _embedded_only(servers: Servers) -> None:
    if servers.embedded is None:
        pytest.skip("needs the embedded nats-server, whose users the tests can change")


@dataclass
class Session:
    """A connection as one identity, with every error the server sent it."""

    nc: NatsClient
    errors: list[Exception] = field(default_factory=list)

    def refusals(self) -> list[str]:
        """The server's refusals, lower-cased (as nats-py reports them)."""
        return [str(error).lower() for error in self.errors if "permissions violation" in str(error).lower()]


Connect = Callable[[Path | None], Awaitable[Session]]


@pytest.fixture
async def connect_as(settings: Settings) -> AsyncIterator[Connect]:
    sessions: list[Session] = []

    async def connect(seed_file: Path | None) -> Session:
        session = Session(nc=NatsClient())

        async def record(error: Exception) -> None:
            session.errors.append(error)

        await session.nc.connect(
            settings.nats_url, error_cb=record, allow_reconnect=False, **connect_options(seed_file)
        )
        sessions.append(session)
        return session

    yield connect
    for session in sessions:
        await session.nc.close()


async def refused(session: Session, subject: str) -> str:
    """Publish to `subject` and return the server's refusal (failing if none comes)."""
    before = len(session.refusals())
    await session.nc.publish(subject, b"{}")
    await session.nc.flush()
    await eventually(lambda: asyncio.sleep(0, len(session.refusals()) > before), within=5)
    return session.refusals()[-1]


async def subscription_refused(session: Session, subject: str) -> str:
    before = len(session.refusals())
    await session.nc.subscribe(subject)
    await session.nc.flush()
    await eventually(lambda: asyncio.sleep(0, len(session.refusals()) > before), within=5)
    return session.refusals()[-1]


async def test_a_connection_without_credentials_is_refused(settings: Settings) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(settings.nats_url, allow_reconnect=False, connect_timeout=2)


async def test_an_unknown_key_is_refused(settings: Settings, tmp_path: Path) -> None:
    """A well-formed NKey the server was never told about gets nowhere."""
    stranger = CredentialStore(tmp_path / "elsewhere", settings.subject_prefix)
    stranger.ensure_installation()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            settings.nats_url,
            allow_reconnect=False,
            connect_timeout=2,
            **connect_options(stranger.seed_file(Role.POLICY_GATE)),
        )


def test_a_seed_others_can_read_is_not_used(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "creds", "warden")
    store.ensure_installation()
    seed = store.seed_file(Role.OPERATOR)
    assert seed.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "creds").stat().st_mode & 0o777 == 0o700
    seed.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by others"):
        connect_options(seed)


# One forbidden publish per service: another service's job, which the server refuses.
FORBIDDEN_PUBLISH = [
    pytest.param(Role.SCHEDULER, DecisionMade, id="scheduler-cannot-decide"),
    pytest.param(Role.AGENT_RUNNER, DecisionMade, id="runner-cannot-decide"),
    pytest.param(Role.AUDIT_PROJECTOR, DecisionMade, id="projector-cannot-decide"),
    pytest.param(Role.OPERATOR, DecisionMade, id="operator-cannot-decide"),
    pytest.param(Role.POLICY_GATE, RunStarted, id="gate-cannot-start-runs"),
    pytest.param(Role.SCHEDULER, RunStarted, id="scheduler-cannot-start-runs"),
    pytest.param(Role.AGENT_RUNNER, RunDispatched, id="runner-cannot-dispatch"),
    pytest.param(Role.POLICY_GATE, StreamGapDetected, id="gate-cannot-report-gaps"),
    pytest.param(Role.AGENT_RUNNER, CommandRejected, id="runner-cannot-reject"),
]


@pytest.mark.parametrize(("role", "payload"), FORBIDDEN_PUBLISH)
async def test_a_service_cannot_publish_another_services_events(
    settings: Settings, connect_as: Connect, role: Role, payload: type[DecisionMade]
) -> None:
    session = await connect_as(settings.seed_file_for(role))
    subject = Subjects(settings.subject_prefix).event("acme", payload, "run1")
    assert subject.lower() in await refused(session, subject)


@pytest.mark.parametrize("role", [Role.POLICY_GATE, Role.AGENT_RUNNER, Role.AUDIT_PROJECTOR, Role.OPERATOR])
async def test_only_the_scheduler_hands_out_work(settings: Settings, connect_as: Connect, role: Role) -> None:
    session = await connect_as(settings.seed_file_for(role))
    subject = Subjects(settings.subject_prefix).work("acme")
    assert subject.lower() in await refused(session, subject)


@pytest.mark.parametrize(
    ("role", "subject"),
    [
        pytest.param(Role.AGENT_RUNNER, "{prefix}.cmd.>", id="runner-cannot-listen-to-commands"),
        pytest.param(Role.POLICY_GATE, "{prefix}.evt.>", id="gate-cannot-listen-to-events"),
        pytest.param(Role.SCHEDULER, "_INBOX.>", id="scheduler-cannot-read-shared-inboxes"),
        pytest.param(Role.AUDIT_PROJECTOR, "{gate_inbox}.>", id="projector-cannot-read-the-gates-inbox"),
        pytest.param(Role.PROVISIONER, "{prefix}.work.>", id="provisioner-cannot-listen-to-work"),
    ],
)
async def test_a_service_cannot_subscribe_beyond_its_own(
    settings: Settings, connect_as: Connect, role: Role, subject: str
) -> None:
    session = await connect_as(settings.seed_file_for(role))
    gate_seed = settings.seed_file_for(Role.POLICY_GATE)
    assert gate_seed is not None
    gate_inbox = inbox_prefix(public_key(read_seed(gate_seed)))
    wanted = subject.format(prefix=settings.subject_prefix, gate_inbox=gate_inbox)
    assert wanted.lower() in await subscription_refused(session, wanted)


@pytest.mark.parametrize("role", INSTALLATION_ROLES)
async def test_no_identity_can_erase_the_audit(settings: Settings, connect_as: Connect, role: Role) -> None:
    """Deleting or purging an audited stream, or deleting one of its messages: refused to every
    identity Warden issues, the provisioner included."""
    session = await connect_as(settings.seed_file_for(role))
    js = session.nc.jetstream(timeout=1)
    events = StreamNames.for_prefix(settings.subject_prefix).events
    for attempt in (js.delete_stream(events), js.purge_stream(events), js.delete_msg(events, 1)):
        with pytest.raises(TimeoutError):  # the server refuses the request: no answer comes
            await attempt
    refusals = " ".join(session.refusals())
    for verb in ("stream.delete", "stream.purge", "stream.msg.delete"):
        assert f"$js.api.{verb}.{events.lower()}" in refusals


async def test_the_audited_streams_deny_delete_and_purge(nc: NatsClient, settings: Settings) -> None:
    """The streams themselves refuse to lose messages, whoever asks (the session superuser here)."""
    names = StreamNames.for_prefix(settings.subject_prefix)
    for stream in names.audited:
        config: StreamConfig = (await nc.jetstream().stream_info(stream)).config
        assert config.deny_delete, stream
        assert config.deny_purge, stream
    await nc.jetstream().publish(f"{settings.subject_prefix}.evt.acme.run.r1.run.started", b"{}")
    with pytest.raises(nats.js.errors.Error, match=r"delete|purge"):
        await nc.jetstream().delete_msg(names.events, 1)
    with pytest.raises(nats.js.errors.Error, match=r"delete|purge"):
        await nc.jetstream().purge_stream(names.events)


async def test_only_the_provisioner_changes_streams(settings: Settings, connect_as: Connect) -> None:
    names = StreamNames.for_prefix(settings.subject_prefix)
    for role in (Role.POLICY_GATE, Role.SCHEDULER, Role.AGENT_RUNNER, Role.AUDIT_PROJECTOR, Role.OPERATOR):
        session = await connect_as(settings.seed_file_for(role))
        refusal = await refused(session, f"$JS.API.STREAM.UPDATE.{names.events}")
        assert f"$js.api.stream.update.{names.events.lower()}" in refusal, role
    provisioner = await connect_as(settings.seed_file_for(Role.PROVISIONER))
    info = await provisioner.nc.jetstream().stream_info(names.events)
    assert info.config.name == names.events


@dataclass
class Tenants:
    acme: Path
    globex: Path


@pytest.fixture
async def tenants(servers: Servers, settings: Settings) -> Tenants:
    """Client credentials for alice of acme and gina of globex, admitted to the running server."""
    assert settings.nats_credentials_dir is not None
    assert servers.embedded is not None
    store = CredentialStore(settings.nats_credentials_dir, settings.subject_prefix)
    acme, globex = store.issue("acme", "alice"), store.issue("globex", "gina")
    await servers.embedded.authorize()
    return Tenants(acme.seed_file, globex.seed_file)


async def _acme_has_a_run(settings: Settings, nc: NatsClient) -> int:
    """One of acme's events in the stream (its input a secret globex must not read); its sequence."""
    subjects = Subjects(settings.subject_prefix)
    event = make_envelope(
        RunStarted(decision_id="d1", worker="w"), tenant="acme", entity_id="r1", actor="runner", source="t"
    )
    ack = await nc.jetstream().publish(subjects.expected_subject(event), event.to_bytes())
    return ack.seq


async def test_a_tenant_reads_and_submits_for_its_own_tenant(
    settings: Settings, nc: NatsClient, tenants: Tenants
) -> None:
    await _acme_has_a_run(settings, nc)
    async with await WardenClient.connect(settings.nats_url, settings.subject_prefix, seed_file=tenants.acme) as acme:
        first = await acme.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="k1")
        again = await acme.submit_run(tenant="acme", agent="demo", actor="alice", idempotency_key="k1")
        assert (again.duplicate, again.run_id) == (True, first.run_id)  # read back from the commands stream
        events = [event async for event in acme.tail("acme", idle_timeout=1.5)]
    assert [event.envelope.type for event in events if event.envelope] == ["run.started"]


async def test_a_tenant_cannot_reach_another_tenants_events_by_any_path(
    settings: Settings, nc: NatsClient, tenants: Tenants, connect_as: Connect
) -> None:
    """globex's credential against acme's events: every way in is refused by the server."""
    seq = await _acme_has_a_run(settings, nc)
    subjects = Subjects(settings.subject_prefix)
    names = StreamNames.for_prefix(settings.subject_prefix)
    acme_events = subjects.tenant_events("acme")
    gina = await connect_as(tenants.globex)
    js = gina.nc.jetstream(timeout=1)

    # A core subscription.
    assert acme_events.lower() in await subscription_refused(gina, acme_events)
    # A consumer whose filter is acme's: named (filter in the subject), and nats-py's unnamed kind.
    with pytest.raises(TimeoutError):
        await FilteredReader(gina.nc, names.events, acme_events, _ignore).start()
    with pytest.raises(TimeoutError):
        await js.subscribe(acme_events, stream=names.events, ordered_consumer=True)
    # A consumer with globex's own filter, but named as the projector's durable: not a way to
    # re-point (and so read through, or starve) a service's consumer.
    with pytest.raises(TimeoutError):
        await js.add_consumer(
            names.events,
            ConsumerConfig(name=PROJECTOR_CONSUMER, filter_subject=subjects.tenant_events("globex")),
        )
    # Single messages: direct get by sequence and by subject, the stream's message get.
    with pytest.raises(TimeoutError):
        await js.get_msg(names.events, seq, direct=True)
    with pytest.raises(TimeoutError):
        await js.get_last_msg(names.events, f"{subjects.prefix}.evt.acme.run.r1.run.started", direct=True)
    with pytest.raises(TimeoutError):
        await js.get_msg(names.events, seq)
    # Stream info (it lists subjects on request) and the commands stream's contents.
    with pytest.raises(TimeoutError):
        await js.stream_info(names.events, subjects_filter=">")
    with pytest.raises(TimeoutError):
        await js.get_msg(names.commands, 1, direct=True)
    # The client's own replay of acme's events.
    client = WardenClient(gina.nc, settings.subject_prefix)
    with pytest.raises(TimeoutError):
        _ = [event async for event in client.tail("acme", idle_timeout=1)]
    # Submitting for acme: the server drops the publish, so no acknowledgement comes.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.submit_run(tenant="acme", agent="demo", actor="gina"), 3)
    refusals = " ".join(gina.refusals())
    for request in (
        f"$js.api.consumer.create.{names.events}.",
        f"$js.api.direct.get.{names.events}",
        f"$js.api.stream.msg.get.{names.events}",
        f"$js.api.stream.info.{names.events}",
        f"$js.api.direct.get.{names.commands}",
        f"{subjects.prefix}.cmd.acme.gina.run.submitted",
    ):
        assert request.lower() in refusals, request


async def _ignore(_: object) -> None:
    pass


async def test_a_tenant_credential_cannot_submit_as_another_actor(
    settings: Settings, tenants: Tenants, connect_as: Connect
) -> None:
    """alice's credential may publish on alice's subject only: submitting as bob is refused by the server."""
    alice = await connect_as(tenants.acme)
    client = WardenClient(alice.nc, settings.subject_prefix)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.submit_run(tenant="acme", agent="demo", actor="bob"), 3)
    assert f"{settings.subject_prefix}.cmd.acme.bob.run.submitted".lower() in " ".join(alice.refusals())


async def test_a_tenant_credential_cannot_send_a_policy_change(
    settings: Settings, tenants: Tenants, connect_as: Connect
) -> None:
    """Only the operator's credential may send a policy change: alice's is refused by the server, under the
    installation's tenant and under her own."""
    alice = await connect_as(tenants.acme)
    client = WardenClient(alice.nc, settings.subject_prefix)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.rollback_policy(actor="alice", wait_seconds=1), 3)
    own = make_envelope(
        PolicyChangeRequested(change="promote"), tenant="acme", entity_id="lifecycle", actor="alice", source="t"
    )
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.publish_command(own), 3)
    refused = " ".join(alice.refusals())
    for tenant in ("_warden", "acme"):
        assert f"{settings.subject_prefix}.cmd.{tenant}.alice.policy.change_requested".lower() in refused


async def test_a_command_claiming_another_actor_is_rejected_on_the_record(
    settings: Settings, nc: NatsClient, tenants: Tenants, connect_as: Connect, run_app: AppRunner
) -> None:
    """On alice's own subject, a command whose envelope claims bob: stored (the audit keeps it, and the
    subject that proves who sent it), rejected by the gate as `actor_mismatch`, never decided."""
    await run_app(build_gate(settings))
    alice = await connect_as(tenants.acme)
    claimed = make_envelope(RunSubmitted(agent="demo"), tenant="acme", entity_id="r-claim", actor="bob", source="t")
    subject = Subjects(settings.subject_prefix).command("acme", RunSubmitted.TYPE, "alice")
    stored = await alice.nc.jetstream().publish(
        subject, claimed.to_bytes(), headers={"Nats-Msg-Id": "acme:run.submitted:k"}
    )

    client = WardenClient(nc, settings.subject_prefix)
    outcome = await client.outcome("acme", Receipt(claimed.id, "r-claim", stored.seq, duplicate=False), within=10)
    assert outcome.status == "rejected"
    assert outcome.reasons[0].startswith("actor_mismatch: the command claims actor 'bob', but was sent by 'alice'")


async def test_a_revoked_credential_is_refused_from_the_reload_on(
    servers: Servers, settings: Settings, tenants: Tenants
) -> None:
    """Revoked: a new connection is refused, and the server closes the one already open."""
    assert settings.nats_credentials_dir is not None
    assert servers.embedded is not None
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    async def quiet(_: Exception) -> None:
        pass

    alice = await nats.connect(
        settings.nats_url,
        allow_reconnect=False,
        closed_cb=on_closed,
        error_cb=quiet,
        **connect_options(tenants.acme),
    )
    store = CredentialStore(settings.nats_credentials_dir, settings.subject_prefix)
    revoked = store.revoke("acme", "alice").public_key
    await servers.embedded.authorize()
    await asyncio.wait_for(closed.wait(), 10)
    assert alice.is_closed
    with pytest.raises(CredentialError, match="cannot read"):
        connect_options(tenants.acme)  # the seed file is gone
    assert revoked not in (servers.embedded.config_dir / "authorization.conf").read_text()


async def test_the_operators_reads_across_tenants_are_on_the_servers_record(
    settings: Settings, nc: NatsClient, connect_as: Connect
) -> None:
    """The operator reads any tenant, and only in ways the server records on the access stream:
    its tail of acme's events is listed by `warden audit access`, with its identity and filter; a
    direct or message get, or a core subscription, which the server would not record, is refused."""
    seq = await _acme_has_a_run(settings, nc)
    subjects = Subjects(settings.subject_prefix)
    names = StreamNames.for_prefix(settings.subject_prefix)
    operator = await connect_as(settings.seed_file_for(Role.OPERATOR))
    events = [e async for e in WardenClient(operator.nc, settings.subject_prefix).tail("acme", idle_timeout=1)]
    assert [event.envelope.type for event in events if event.envelope] == ["run.started"]

    output = await warden_cli(settings, "audit", "access")
    accesses = [json.loads(line) for line in output.splitlines()]
    reads = [access for access in accesses if subjects.tenant_events("acme") in access["filter"]]
    assert reads, output
    assert {access["identity"] for access in reads} == {"operator"}
    assert all(f".{names.events}." in access["request"] for access in reads)
    assert not any(access["identity"] in {"policy-gate", "agent-runner"} for access in accesses), "services left out"

    js = operator.nc.jetstream(timeout=1)
    with pytest.raises(TimeoutError):
        await js.get_msg(names.events, seq, direct=True)
    with pytest.raises(TimeoutError):
        await js.get_msg(names.events, seq)
    assert subjects.all_events.lower() in await subscription_refused(operator, subjects.all_events)
    refusals = " ".join(operator.refusals())
    assert f"$js.api.direct.get.{names.events}".lower() in refusals
    assert f"$js.api.stream.msg.get.{names.events}".lower() in refusals


async def test_no_identity_can_erase_or_forge_the_access_record(
    settings: Settings, nc: NatsClient, connect_as: Connect
) -> None:
    names = StreamNames.for_prefix(settings.subject_prefix)
    config: StreamConfig = (await nc.jetstream().stream_info(names.access)).config
    assert (config.deny_delete, config.deny_purge) == (True, True)
    for role in INSTALLATION_ROLES:
        session = await connect_as(settings.seed_file_for(role))
        js = session.nc.jetstream(timeout=1)
        for attempt in (js.purge_stream(names.access), js.delete_msg(names.access, 1)):
            with pytest.raises(TimeoutError):
                await attempt
        assert ACCESS_SUBJECT.lower() in await refused(session, ACCESS_SUBJECT), role


async def test_only_the_projector_reads_the_advisories_and_no_identity_can_erase_or_forge_them(
    settings: Settings, nc: NatsClient, connect_as: Connect
) -> None:
    """The stream of advisories on messages consumers gave up on denies delete and purge; every identity is
    refused erasing it and publishing an advisory (only the server does); only the projector may consume it."""
    names = StreamNames.for_prefix(settings.subject_prefix)
    config: StreamConfig = (await nc.jetstream().stream_info(names.advisories)).config
    assert (config.deny_delete, config.deny_purge) == (True, True)
    forged = f"{TERMINATED_ADVISORY}.{names.commands}.{GATE_CONSUMER}"
    for role in INSTALLATION_ROLES:
        session = await connect_as(settings.seed_file_for(role))
        js = session.nc.jetstream(timeout=1)
        for attempt in (
            js.delete_stream(names.advisories),
            js.purge_stream(names.advisories),
            js.delete_msg(names.advisories, 1),
        ):
            with pytest.raises(TimeoutError):
                await attempt
        assert forged.lower() in await refused(session, forged), role
        if role is not Role.AUDIT_PROJECTOR:
            create = f"$JS.API.CONSUMER.DURABLE.CREATE.{names.advisories}.{PROJECTOR_CONSUMER}"
            assert create.lower() in await refused(session, create), role

    projector = await connect_as(settings.seed_file_for(Role.AUDIT_PROJECTOR))
    js = projector.nc.jetstream(timeout=2)
    await js.add_consumer(
        names.advisories, ConsumerConfig(durable_name=PROJECTOR_CONSUMER, ack_policy=AckPolicy.EXPLICIT)
    )
    subscription = await js.pull_subscribe_bind(durable=PROJECTOR_CONSUMER, stream=names.advisories)
    with pytest.raises(TimeoutError):
        await subscription.fetch(1, timeout=0.5)  # nothing to read yet, and no refusal
    assert projector.refusals() == []
