"""The policy lifecycle a gate follows: the bundle in force, the shadow beside it, and what a rollback returns to."""

from typing import Any

from warden.messages import Envelope, PolicyChanged, PolicyChangeRequested, make_envelope
from warden.policy_bundle import PolicyBundle, PolicyBundleError, revision_token
from warden.policy_gate.activation import SERVICE, activation
from warden.policy_gate.engine import PolicyEngine, PolicyLoadError
from warden.policy_lifecycle import Lifecycle
from warden.subjects import SYSTEM_TENANT


class PolicyLifecycle(Lifecycle[PolicyEngine]):
    """A gate's policy lifecycle: each bundle as a loaded engine, so that a promote or a rollback
    only moves engines already loaded, and the gate switches between two decisions, with no pause.

    Besides following the lifecycle, the gate judges whether a change can be made (`refusal`)
    and records the allowed ones (`change_event`).
    """

    def __init__(self, active: PolicyEngine, origin: str = "") -> None:
        super().__init__(active, lambda engine: engine.revision, origin=origin)
        # A candidate loaded to judge a shadow command, kept for the event that loads it (by revision).
        self._candidates: dict[str, PolicyEngine] = {}

    def refusal(self, change: PolicyChangeRequested) -> str | None:
        """Why this gate cannot make `change` now (None: it can); the reason a deny records."""
        if change.change == "shadow":
            return self._shadow_refusal(change)
        if change.change in ("promote", "withdraw"):
            verb = "promote" if change.change == "promote" else "withdraw"
            if self.shadow is None:
                return f"there is no shadow bundle to {verb}: load one first (warden policy shadow DIR)"
            if change.revision is not None and change.revision != self.shadow.revision:
                return f"the shadow bundle is {self.shadow.revision}, not {change.revision}: nothing to {verb}"
            return None
        if not self.earlier:
            return (
                f"there is no earlier bundle to roll back to: {self.active.revision} has been in force since the "
                "gates started on it"
            )
        return None

    def _shadow_refusal(self, change: PolicyChangeRequested) -> str | None:
        bundle = PolicyBundle(change.files or {})
        try:
            candidate = PolicyEngine.from_bundle(bundle, f"candidate {bundle.revision}")
            # Its files must fit a policy.activated event, or it could never be promoted.
            activation(candidate, cause="promote", activated_by=SERVICE, origin="(candidate)")
        except (PolicyLoadError, PolicyBundleError) as exc:
            return f"the candidate bundle was refused: {exc}"
        if change.revision is not None and change.revision != candidate.revision:
            return (
                f"the candidate's files make revision {candidate.revision}, not {change.revision} as the command says"
            )
        if candidate.revision == self.active.revision:
            return f"the candidate is the bundle in force ({candidate.revision}): there is nothing to compare"
        self._candidates[candidate.revision] = candidate
        return None

    def change_event(
        self, change: Envelope[Any], decision_id: str, request_seq: int
    ) -> tuple[Envelope[PolicyChanged], str] | None:
        """The `policy.changed` event that records an allowed change, and its key; None when the
        lifecycle no longer allows it (a redelivered promote, rollback or withdrawal, followed already)."""
        data = change.data
        assert isinstance(data, PolicyChangeRequested)
        if data.change == "shadow":
            revision, files = PolicyBundle(data.files or {}).revision, data.files
        elif data.change in ("promote", "withdraw") and self.shadow is not None:
            revision, files = self.shadow.revision, None
        elif data.change == "rollback" and self.earlier:
            revision, files = self.earlier[-1].revision, None
        else:
            return None
        event = make_envelope(
            PolicyChanged(
                change=data.change,
                revision=revision,
                previous_revision=self.active.revision,
                files=files,
                changed_by=change.actor,
                reason=data.reason,
                decision_id=decision_id,
                request_seq=request_seq,
            ),
            tenant=SYSTEM_TENANT,
            entity_id=revision_token(revision),
            actor=SERVICE,
            source=SERVICE,
            caused_by=change,
        )
        # Keyed by the command: a redelivered command records its change once.
        return event, f"policy-changed-{request_seq}"

    def follow(self, changed: PolicyChanged, stream_seq: int) -> str | None:
        """Fold one `policy.changed` in (see `Lifecycle.apply`); a shadow's engine is the one loaded
        to judge its command when this gate judged it, else loaded from the event's files."""
        problem: list[str] = []

        def shadow() -> PolicyEngine | None:
            bundle = PolicyBundle(changed.files or {})
            candidate = self._candidates.pop(bundle.revision, None)
            if candidate is None:
                try:
                    candidate = PolicyEngine.from_bundle(bundle, f"events:{stream_seq}")
                except (PolicyLoadError, PolicyBundleError) as exc:
                    problem.append(f"the shadow bundle of events:{stream_seq} does not load here: {exc}")
                    return None
            return candidate

        refused = self.apply(changed, stream_seq, shadow)
        self._candidates.clear()
        return problem[0] if problem else refused
