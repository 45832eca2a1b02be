"""The Python client for Warden's users: publish commands and tail events, over plain NATS."""

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import JsonValue

from warden.controls import Control, ControlView, scope_token
from warden.endpoints import NoStack, credentials_dir, read_endpoints
from warden.errors import InvalidMessage, PermanentError, RejectionCode, RetryableError
from warden.identity import SEED_SUFFIX, CredentialError, connect_options
from warden.ids import new_id
from warden.messages import (
    POLICY_LIFECYCLE,
    ApprovalAnswered,
    ApprovalRequested,
    CommandRejected,
    DecisionMade,
    Envelope,
    HaltLiftRequested,
    HaltRequested,
    Payload,
    PolicyActivated,
    PolicyChanged,
    PolicyChangeRequested,
    RunCancelled,
    RunCancelRequested,
    RunFailed,
    RunSubmitted,
    RunSucceeded,
    make_envelope,
    parse_envelope,
)
from warden.permissions import Role
from warden.policy_bundle import PolicyBundle
from warden.policy_lifecycle import Lifecycle
from warden.reader import FilteredReader
from warden.streams import STREAM_MAX_MSG_BYTES, StreamNames
from warden.subjects import SYSTEM_TENANT, Subjects
from warden.wire import (
    connect,
    is_transient,
    message_headers,
    new_traceparent,
)

try:
    # An application that uses OpenTelemetry gets its current trace carried into the run; the
    # client itself needs only nats-py and pydantic, so the API is optional.
    from opentelemetry import propagate
except ImportError:  # pragma: no cover - depends on what the application installed
    propagate = None  # type: ignore[assignment]


class CommandTooLarge(PermanentError):
    """The command is over the size limit; it was not sent."""


class UnknownApproval(PermanentError):
    """No approval request with that id in the tenant's events."""


class IdempotencyKeyTaken(PermanentError):
    """The idempotency key is held by a message that is not this tenant's command of this type.

    Keys are scoped by tenant and type, so only a client that wrote another tenant's scope into
    its Nats-Msg-Id (which the gate rejects, on the record) can cause this. The command was not
    stored; retry with another key.
    """


@dataclass(frozen=True)
class Receipt:
    """What JetStream said when it stored a command: for a duplicate, the command stored first."""

    command_id: str
    run_id: str  # the run the command is about
    stream_seq: int
    duplicate: bool  # True when this idempotency key was already stored: nothing new was queued


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as far as its events tell: its status and the reasons given."""

    status: str  # rejected, denied, awaiting_approval, succeeded, failed, cancelled, or pending (no outcome yet)
    reasons: list[str]


@dataclass(frozen=True)
class TailedEvent:
    """An event read from the stream, with where it sits in it."""

    stream_seq: int
    nats_subject: str
    envelope: Envelope[Any] | None  # None when the stored bytes are not a valid envelope
    raw: bytes
    error: str | None = None


@dataclass(frozen=True)
class ApprovalRequest:
    """A tool call that awaits (or awaited) approval, as its approval.requested event says."""

    stream_seq: int  # where the request sits in the events stream (an answer names it)
    run_id: str
    request: ApprovalRequested
    status: str = "pending"  # pending, approved, rejected, expired or closed (see `approval_status`)


@dataclass(frozen=True)
class AnswerOutcome:
    """What became of an answer: the gate's decision on it, once made (None: not within the wait)."""

    receipt: Receipt
    effect: str | None  # allow (approved), deny (rejected or too late), require_approval (it does not count)
    reasons: list[str]

    @property
    def counted(self) -> bool:
        return self.effect in ("allow", "deny")


@dataclass(frozen=True)
class ControlOutcome:
    """What became of a cancel, a halt, a lift or a policy change: the gate's decision on it (effect
    None: not within the wait)."""

    receipt: Receipt
    effect: str | None  # allow: in force from the moment the decision was stored; deny: refused
    reasons: list[str]
    decision_id: str | None = None
    decision_seq: int | None = None  # where the decision sits in the events stream
    decided_at: datetime | None = None

    @property
    def in_force(self) -> bool:
        return self.effect == "allow"


@dataclass(frozen=True)
class PolicyStatus:
    """Where the installation's policy stands, as its events tell: the bundle in force, the shadow
    beside it, what a rollback would return to, and the changes so far (oldest first)."""

    active: str | None  # the revision last put in force (None: no gate has recorded one)
    shadow: str | None
    rollback_to: str | None
    changes: list[dict[str, Any]]


def policy_status(events: list[tuple[int, Envelope[Any]]]) -> PolicyStatus:
    """Fold `policy.activated` and `policy.changed` events (in stream order) as the gates fold them."""
    lifecycle: Lifecycle[str | None] = Lifecycle(None, lambda revision: revision or "")
    changes = []
    for seq, envelope in events:
        data = envelope.data
        if isinstance(data, PolicyActivated) and data.cause == "start":
            # A gate's start: its configured bundle, or where the lifecycle had taken it.
            lifecycle.active = data.revision
        elif isinstance(data, PolicyChanged):
            lifecycle.apply(data, seq, functools.partial(str, data.revision))
            changes.append(
                {
                    "stream_seq": seq,
                    "time": envelope.time.isoformat(),
                    "change": data.change,
                    "revision": data.revision,
                    "by": data.changed_by,
                    "reason": data.reason,
                }
            )
    earlier = lifecycle.earlier[-1] if lifecycle.earlier else None
    return PolicyStatus(lifecycle.active, lifecycle.shadow, earlier, changes)


# How long reading one stored command back may take (a duplicate submission's receipt).
READ_TIMEOUT_SECONDS = 5.0


def approval_status(request: ApprovalRequested, run_events: list[Envelope[Any]], now: datetime) -> str:
    """Where an approval request stands, from its run's events: the first answer that counted
    (a decision on the call from an answer: allow or deny) decides; else it is expired past its
    expiry, closed once its call or run has ended, and pending otherwise."""
    for envelope in run_events:
        data = envelope.data
        if (
            isinstance(data, DecisionMade)
            and data.request_type == ApprovalAnswered.TYPE
            and data.tool_call_id == request.tool_call_id
            and data.effect in ("allow", "deny")
        ):
            return "approved" if data.effect == "allow" else "rejected"
    if request.expires_at <= now:
        return "expired"
    ended = any(
        isinstance(envelope.data, RunSucceeded | RunFailed | RunCancelled)
        or (
            getattr(envelope.data, "tool_call_id", None) == request.tool_call_id
            and envelope.type == "tool_call.completed"
        )
        for envelope in run_events
    )
    return "closed" if ended else "pending"


def _stack_seed_file(state_dir: Path) -> Path | None:
    """The identity a client started without one uses: WARDEN_NATS_SEED_FILE, else the operator's
    credential among WARDEN_NATS_CREDENTIALS_DIR's or the stack's (the same as the CLI's)."""
    if named := os.environ.get("WARDEN_NATS_SEED_FILE"):
        return Path(named)
    directory = Path(os.environ.get("WARDEN_NATS_CREDENTIALS_DIR") or credentials_dir(state_dir))
    operator = directory / f"{Role.OPERATOR.value}{SEED_SUFFIX}"
    return operator if operator.exists() else None


class WardenClient:
    """Connects to a Warden installation's NATS and speaks its subjects."""

    def __init__(self, nc: NatsClient, prefix: str = "warden", max_command_bytes: int = 64 * 1024) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = Subjects(prefix)
        self.streams = StreamNames.for_prefix(prefix)
        self.max_command_bytes = max_command_bytes

    @classmethod
    async def connect_to_stack(cls, state_dir: str | Path | None = None, **options: Any) -> Self:
        """Connect to the servers WARDEN_NATS_URL names, else to the stack `warden up` runs on `state_dir`
        (default: WARDEN_STATE_DIR, else `.warden`).

        The identity is the seed file WARDEN_NATS_SEED_FILE names; else, on the stack's own host,
        its operator credential. The subject prefix is WARDEN_SUBJECT_PREFIX's, else `warden`.
        Raises `NoStack` at once when neither is there, or when no server answers there.
        """
        state_dir = Path(state_dir or os.environ.get("WARDEN_STATE_DIR") or ".warden")
        url = os.environ.get("WARDEN_NATS_URL") or read_endpoints(state_dir).nats_url
        seed_file = _stack_seed_file(state_dir)
        try:
            client = await cls.connect(
                url, os.environ.get("WARDEN_SUBJECT_PREFIX", "warden"), seed_file=seed_file, **options
            )
        except nats.errors.Error as exc:
            if "authorization violation" in str(exc).lower():
                raise CredentialError(
                    f"NATS at {url} refused the credential {seed_file or '(none)'}: "
                    "set WARDEN_NATS_SEED_FILE to one `warden credentials issue` made"
                ) from exc
            raise NoStack(f"cannot reach NATS at {url} ({exc}); is the stack running (`warden up`)?") from exc
        except OSError as exc:
            raise NoStack(f"cannot reach NATS at {url} ({exc}); is the stack running (`warden up`)?") from exc
        if limit := os.environ.get("WARDEN_MAX_COMMAND_BYTES"):
            client.max_command_bytes = int(limit)
        return client

    @classmethod
    async def connect(cls, url: str, prefix: str = "warden", *, seed_file: Path | None = None, **options: Any) -> Self:
        """Connect to the servers `url` names (one URL, or several separated by commas: a cluster's
        seed nodes) as the identity whose NKey seed is in `seed_file`."""
        return cls(await connect(url, **connect_options(seed_file), **options), prefix)

    async def close(self) -> None:
        await self.nc.drain()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def publish_command(self, envelope: Envelope[Any], idempotency_key: str | None = None) -> Receipt:
        """Store a command in JetStream. Retrying with the same key stores it once (`duplicate`)."""
        if envelope.data.KIND != "command":
            raise InvalidMessage(RejectionCode.SUBJECT_MISMATCH, f"{envelope.type} is an event, not a command")
        body = envelope.to_bytes()
        if len(body) > self.max_command_bytes:
            raise CommandTooLarge(f"command is {len(body)} bytes; the limit is {self.max_command_bytes}")
        try:
            # The actor is named in the subject, where the server holds each credential to its own.
            subject = self.subjects.command(envelope.tenant, envelope.type, envelope.actor)
        except ValueError as exc:
            raise InvalidMessage(RejectionCode.SCHEMA_INVALID, str(exc)) from exc
        try:
            ack = await self.js.publish(
                subject,
                body,
                headers=_command_headers(envelope, idempotency_key),
                stream=self.streams.commands,
            )
        except nats.errors.Error as exc:
            if is_transient(exc):
                raise RetryableError(f"JetStream did not acknowledge the command (send it again): {exc!r}") from exc
            raise
        if ack.duplicate:
            return await self._first_submission(envelope, ack.seq)
        return Receipt(envelope.id, envelope.entity_id, ack.seq, duplicate=False)

    async def _first_submission(self, envelope: Envelope[Any], seq: int) -> Receipt:
        """The receipt of the command already stored under this key: a retry learns the run it started.

        Read through a consumer filtered to this command's own subject, which a tenant's
        credential may do; the key is scoped by tenant and type, so the command it names is
        on that subject (if it is not, the first one found after it is, and is refused below).
        """
        expected = self.subjects.expected_subject(envelope)
        found: asyncio.Queue[Msg] = asyncio.Queue()
        reader = FilteredReader(self.nc, self.streams.commands, expected, found.put, start_seq=seq)
        await reader.start()
        try:
            stored = await asyncio.wait_for(found.get(), READ_TIMEOUT_SECONDS)
        except TimeoutError as exc:
            raise IdempotencyKeyTaken(f"the key is held by command {seq}, which is not on {expected!r}") from exc
        finally:
            await reader.stop()
        if stored.metadata.sequence.stream != seq:
            raise IdempotencyKeyTaken(f"the key is held by command {seq}, which is not on {expected!r}")
        try:
            first = parse_envelope(stored.data or b"")
        except InvalidMessage as exc:
            raise IdempotencyKeyTaken(f"the key is held by command {seq}, which is not valid: {exc}") from exc
        if stored.subject != expected or (first.tenant, first.type) != (envelope.tenant, envelope.type):
            raise IdempotencyKeyTaken(f"the key is held by command {seq} on {stored.subject!r}, not {expected!r}")
        return Receipt(first.id, first.entity_id, seq, duplicate=True)

    async def submit_run(
        self,
        *,
        tenant: str,
        agent: str,
        actor: str,
        input: dict[str, JsonValue] | None = None,
        run_id: str | None = None,
        priority: int = 5,
        idempotency_key: str | None = None,
        timeout_seconds: float | None = None,
    ) -> Receipt:
        """Ask for a run. The idempotency key defaults to the run id, so a retried submit runs once.

        `timeout_seconds`: the run's own deadline, counted from now; the policy's deadline for the
        agent applies too, and the stricter wins.

        Submitting again with the same key (within the commands stream's ten-minute duplicate
        window) stores nothing and returns the first submission's receipt, naming its run.
        """
        run_id = run_id or new_id()
        envelope = make_envelope(
            RunSubmitted(agent=agent, input=input or {}, priority=priority, timeout_seconds=timeout_seconds),
            tenant=tenant,
            entity_id=run_id,
            actor=actor,
            source="warden-client",
        )
        return await self.publish_command(envelope, idempotency_key or run_id)

    async def approval_requests(self, tenant: str, *, pending_only: bool = True) -> list[ApprovalRequest]:
        """The tenant's approval requests with their status, oldest first; by default only the pending ones.

        Read from the events stream (what a tenant's credential may read): every approval.requested
        of the tenant, then the events of each run with one that has not expired, for its answers.
        """
        requests = []
        for message in await self._stored(self.subjects.tenant_events_of_type(tenant, ApprovalRequested)):
            try:
                envelope = parse_envelope(message.data)
            except InvalidMessage:
                continue
            if isinstance(envelope.data, ApprovalRequested) and envelope.tenant == tenant:
                requests.append(ApprovalRequest(message.metadata.sequence.stream, envelope.entity_id, envelope.data))
        now = datetime.now(UTC)
        events_of: dict[str, list[Envelope[Any]]] = {}
        found = []
        for request in requests:
            if pending_only and request.request.expires_at <= now:
                continue  # expired: no need to read its run
            if request.run_id not in events_of:
                events_of[request.run_id] = await self._run_events(tenant, request.run_id)
            status = approval_status(request.request, events_of[request.run_id], now)
            if status == "pending" or not pending_only:
                found.append(ApprovalRequest(request.stream_seq, request.run_id, request.request, status))
        return found

    async def answer_approval(
        self,
        *,
        tenant: str,
        approval_id: str,
        actor: str,
        approve: bool,
        reason: str = "",
        wait_seconds: float = 10.0,
    ) -> AnswerOutcome:
        """Approve or reject a tool call awaiting approval, as `actor` (the server holds a tenant's
        credential to its own actor), and wait up to `wait_seconds` for the gate's decision on
        the answer: whether it counts (four eyes, the approver's roles) and what it decided.

        Raises `UnknownApproval` when the tenant has no such approval request.
        """
        requests = await self.approval_requests(tenant, pending_only=False)
        named = next((found for found in requests if found.request.approval_id == approval_id), None)
        if named is None:
            raise UnknownApproval(f"tenant {tenant!r} has no approval request {approval_id!r}")
        envelope = make_envelope(
            ApprovalAnswered(approval_id=approval_id, approval_seq=named.stream_seq, approve=approve, reason=reason),
            tenant=tenant,
            entity_id=named.run_id,
            actor=actor,
            source="warden-client",
        )
        verb = "approve" if approve else "reject"
        receipt = await self.publish_command(envelope, f"{approval_id}-{actor}-{verb}")
        subject = self.subjects.event(tenant, DecisionMade, named.run_id)
        try:
            async with (
                asyncio.timeout(wait_seconds),
                contextlib.aclosing(self._events([subject], from_start=True, idle_timeout=None)) as events,
            ):
                async for event in events:
                    data = event.envelope.data if event.envelope else None
                    if isinstance(data, DecisionMade) and data.request_id == receipt.command_id:
                        return AnswerOutcome(receipt, data.effect, list(data.reasons))
        except TimeoutError:
            pass
        return AnswerOutcome(receipt, None, [f"no decision on the answer within {wait_seconds}s"])

    async def cancel_run(
        self, *, tenant: str, run_id: str, actor: str, reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Ask that a run stop, as `actor`, and wait for the gate's decision. Once an allow is stored,
        a queued run never starts and a running one ends `cancelled` before its next step or call."""
        envelope = make_envelope(
            RunCancelRequested(reason=reason), tenant=tenant, entity_id=run_id, actor=actor, source="warden-client"
        )
        return await self._control(envelope, RunCancelRequested, f"cancel-{run_id}-{actor}", wait_seconds)

    async def halt(
        self, *, tenant: str, actor: str, reason: str, agent: str | None = None, wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Halt every run of a tenant (or of one of its agents) until the halt is lifted (the kill switch)."""
        envelope = make_envelope(
            HaltRequested(agent=agent, reason=reason),
            tenant=tenant,
            entity_id=scope_token(agent),
            actor=actor,
            source="warden-client",
        )
        # Keyed by the command itself: halting again after a lift is a new halt, not a duplicate.
        return await self._control(envelope, HaltRequested, envelope.id, wait_seconds)

    async def lift_halt(
        self, *, tenant: str, actor: str, agent: str | None = None, reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Lift the halt of a tenant (or of one agent): held runs go on."""
        envelope = make_envelope(
            HaltLiftRequested(agent=agent, reason=reason),
            tenant=tenant,
            entity_id=scope_token(agent),
            actor=actor,
            source="warden-client",
        )
        return await self._control(envelope, HaltLiftRequested, envelope.id, wait_seconds)

    async def halts(self, tenant: str) -> dict[str, Control]:
        """The tenant's halts in force, by scope token (`_tenant`, `agent-<name>`), as the gate recorded them.

        Read with the tenant's own credential and not checked against the gate's key: this is a
        listing; the scheduler and runners check every signature before they act.
        """
        view = ControlView()
        for message in await self._stored(self.subjects.tenant_decisions_on(tenant, HaltRequested)):
            with contextlib.suppress(InvalidMessage):
                view.apply(parse_envelope(message.data), message.metadata.sequence.stream, None)
        return {scope: control for (owner, scope), control in view.halts.items() if owner == tenant}

    async def shadow_policy(
        self, bundle: PolicyBundle, *, actor: str = "operator", reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Load `bundle` (`PolicyBundle.read(directory)`) into every gate as the shadow beside the
        bundle in force: each live decision is also judged on it, and each disagreement recorded
        (`decision.shadowed`), never enforced. Decided by the gate: only a policy administrator may.

        Raises `CommandTooLarge` when the bundle does not fit in one command.
        """
        change = PolicyChangeRequested(
            change="shadow", files=dict(bundle.files), revision=bundle.revision, reason=reason
        )
        envelope = self._policy_change(change, actor)
        limit = min(self.max_command_bytes, STREAM_MAX_MSG_BYTES)
        if (size := len(envelope.to_bytes())) > limit:
            raise CommandTooLarge(
                f"policy bundle {bundle.revision} makes a {size}-byte command; commands may be at most {limit} "
                "bytes (WARDEN_MAX_COMMAND_BYTES, which the gate holds them to as well): make the bundle smaller"
            )
        return await self._control(envelope, PolicyChangeRequested, envelope.id, wait_seconds)

    async def promote_policy(
        self, *, actor: str = "operator", revision: str | None = None, reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Put the shadow bundle in force in every gate (`revision`: only if it is that one)."""
        envelope = self._policy_change(PolicyChangeRequested(change="promote", revision=revision, reason=reason), actor)
        return await self._control(envelope, PolicyChangeRequested, envelope.id, wait_seconds)

    async def rollback_policy(
        self, *, actor: str = "operator", reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Put back in force, in every gate, the bundle that was in force before the last promote."""
        envelope = self._policy_change(PolicyChangeRequested(change="rollback", reason=reason), actor)
        return await self._control(envelope, PolicyChangeRequested, envelope.id, wait_seconds)

    async def withdraw_policy(
        self, *, actor: str = "operator", revision: str | None = None, reason: str = "", wait_seconds: float = 10.0
    ) -> ControlOutcome:
        """Unload the shadow bundle from every gate without promoting it (`revision`: only if it is that one)."""
        change = PolicyChangeRequested(change="withdraw", revision=revision, reason=reason)
        envelope = self._policy_change(change, actor)
        return await self._control(envelope, PolicyChangeRequested, envelope.id, wait_seconds)

    async def policy_status(self) -> PolicyStatus:
        """The bundle in force, the shadow and the changes so far, read from the events stream."""
        events = []
        for message in await self._stored(f"{self.subjects.prefix}.evt.{SYSTEM_TENANT}.policy.>"):
            with contextlib.suppress(InvalidMessage):
                events.append((message.metadata.sequence.stream, parse_envelope(message.data)))
        return policy_status(events)

    @staticmethod
    def _policy_change(change: PolicyChangeRequested, actor: str) -> Envelope[Any]:
        return make_envelope(
            change, tenant=SYSTEM_TENANT, entity_id=POLICY_LIFECYCLE, actor=actor, source="warden-client"
        )

    async def _control(
        self, envelope: Envelope[Any], request: type[Payload], key: str, wait_seconds: float
    ) -> ControlOutcome:
        receipt = await self.publish_command(envelope, key)
        subject = self.subjects.decision_on(envelope.tenant, request, envelope.entity_id)
        try:
            async with (
                asyncio.timeout(wait_seconds),
                contextlib.aclosing(self._events([subject], from_start=True, idle_timeout=None)) as events,
            ):
                async for event in events:
                    data = event.envelope.data if event.envelope else None
                    if isinstance(data, DecisionMade) and data.request_id == receipt.command_id:
                        assert event.envelope is not None
                        return ControlOutcome(
                            receipt,
                            data.effect,
                            list(data.reasons),
                            data.decision_id,
                            event.stream_seq,
                            event.envelope.time,
                        )
        except TimeoutError:
            pass
        return ControlOutcome(receipt, None, [f"no decision within {wait_seconds}s"])

    async def _run_events(self, tenant: str, run_id: str) -> list[Envelope[Any]]:
        envelopes = []
        for message in await self._stored(self.subjects.run_events(tenant, run_id)):
            with contextlib.suppress(InvalidMessage):
                envelopes.append(parse_envelope(message.data))
        return envelopes

    async def _stored(self, filter_subject: str) -> list[Msg]:
        """Every message of the events stream on `filter_subject` stored now, in stream order."""
        found: list[Msg] = []
        caught_up = asyncio.Event()

        async def collect(message: Msg) -> None:
            found.append(message)
            if message.metadata.num_pending == 0:
                caught_up.set()

        reader = FilteredReader(self.nc, self.streams.events, filter_subject, collect)
        await reader.start()
        try:
            if reader.pending_at_start:
                await asyncio.wait_for(caught_up.wait(), READ_TIMEOUT_SECONDS)
        finally:
            await reader.stop()
        return found

    async def outcome(self, tenant: str, receipt: Receipt, within: float) -> Outcome:
        """How a submitted run ended: rejected, denied, succeeded or failed; or `pending` after `within` seconds."""
        subjects = [
            self.subjects.run_events(tenant, receipt.run_id),
            self.subjects.command_rejections(tenant, str(receipt.stream_seq)),
        ]
        try:
            async with (
                asyncio.timeout(within),
                contextlib.aclosing(self._events(subjects, from_start=True, idle_timeout=None)) as events,
            ):
                async for event in events:
                    data = event.envelope.data if event.envelope else None
                    if isinstance(data, CommandRejected):
                        return Outcome("rejected", [f"{data.code}: {data.reason}"])
                    if isinstance(data, DecisionMade) and data.tool_call_id is None and data.effect != "allow":
                        status = "denied" if data.effect == "deny" else "awaiting_approval"
                        return Outcome(status, list(data.reasons))
                    if isinstance(data, RunSucceeded):
                        return Outcome("succeeded", [])
                    if isinstance(data, RunFailed):
                        return Outcome("failed", [data.reason])
                    if isinstance(data, RunCancelled):
                        return Outcome("cancelled", [data.reason])
        except TimeoutError:
            pass
        return Outcome("pending", [f"no outcome within {within}s"])

    async def tail(
        self,
        tenant: str,
        run_id: str | None = None,
        *,
        from_start: bool = True,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[TailedEvent, None]:
        """Yield a tenant's events (or one run's) in stream order, from the start or from now.

        Stops after `idle_timeout` seconds without an event, or runs until cancelled when None.
        """
        filter_subject = self.subjects.run_events(tenant, run_id) if run_id else self.subjects.tenant_events(tenant)
        async with contextlib.aclosing(
            self._events([filter_subject], from_start=from_start, idle_timeout=idle_timeout)
        ) as events:
            async for event in events:
                yield event

    async def _events(
        self, filter_subjects: list[str], *, from_start: bool, idle_timeout: float | None
    ) -> AsyncGenerator[TailedEvent, None]:
        """Events on any of `filter_subjects`, each subject's in stream order.

        One filtered reader per subject (see `warden.reader`): what a tenant's credential
        allows, where a single consumer with several filters would not be.
        """
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
        readers = [
            FilteredReader(self.nc, self.streams.events, subject, queue.put, deliver_policy=policy)
            for subject in filter_subjects
        ]
        try:
            for reader in readers:
                await reader.start()
            while True:
                try:
                    message = await asyncio.wait_for(queue.get(), idle_timeout)
                except TimeoutError:
                    return
                yield _tailed(message)
        finally:
            for reader in readers:
                with contextlib.suppress(nats.errors.Error):  # the connection may be closing already
                    await reader.stop()


def _tailed(message: Msg) -> TailedEvent:
    try:
        envelope: Envelope[Any] | None = parse_envelope(message.data)
        error = None
    except InvalidMessage as exc:
        envelope, error = None, str(exc)
    return TailedEvent(message.metadata.sequence.stream, message.subject, envelope, message.data, error)


def _command_headers(envelope: Envelope[Any], idempotency_key: str | None) -> dict[str, str]:
    """A command's headers: a run's trace begins here, unless the caller is already in a span."""
    headers = message_headers(envelope, idempotency_key)
    if propagate is not None:
        propagate.inject(headers)
    if "traceparent" not in headers:
        headers["traceparent"] = new_traceparent()
    return headers
