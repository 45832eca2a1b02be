"""The policy lifecycle a gate follows: the bundle in force, the shadow beside it, and what a rollback returns to."""

from dataclasses import dataclass, field
from typing import Any

from warden.messages import Envelope, PolicyChanged, PolicyChangeRequested, make_envelope
from warden.policy_bundle import PolicyBundle, PolicyBundleError, revision_token
from warden.policy_gate.activation import SERVICE, activation
from warden.policy_gate.engine import PolicyEngine, PolicyLoadError
from warden.subjects import SYSTEM_TENANT


@dataclass
class PolicyLifecycle:
    """Where one gate's policy stands, folded from the `policy.changed` events in stream order.

    Every gate folds the same events from the stream's start, so every gate (a restarted or a
    new one too) ends on the same bundle in force and the same shadow. A promote or a rollback
    only moves engines already loaded: the gate switches between two decisions, with no pause.
    """

    active: PolicyEngine
    shadow: PolicyEngine | None = None
    # The bundles in force before each promote still standing, the latest last: what rollbacks return to.
    earlier: list[PolicyEngine] = field(default_factory=list)
    # Where the bundle in force came from: the gate's directory, or the event that put it in force.
    origin: str = ""
    # A candidate loaded to judge a shadow command, kept for the event that loads it (by revision).
    _candidates: dict[str, PolicyEngine] = field(default_factory=dict)

    def refusal(self, change: PolicyChangeRequested) -> str | None:
        """Why this gate cannot make `change` now (None: it can); the reason a deny records."""
        if change.change == "shadow":
            return self._shadow_refusal(change)
        if change.change == "promote":
            if self.shadow is None:
                return "there is no shadow bundle to promote: load one first (warden policy shadow DIR)"
            if change.revision is not None and change.revision != self.shadow.revision:
                return f"the shadow bundle is {self.shadow.revision}, not {change.revision}: nothing was promoted"
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
    ) -> tuple[Envelope[PolicyChanged], str]:
        """The `policy.changed` event that records an allowed change (checked by `refusal`), and its key."""
        data = change.data
        assert isinstance(data, PolicyChangeRequested)
        if data.change == "shadow":
            revision, files = PolicyBundle(data.files or {}).revision, data.files
        elif data.change == "promote":
            assert self.shadow is not None
            revision, files = self.shadow.revision, None
        else:
            revision, files = self.earlier[-1].revision, None
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

    def next_active(self, changed: PolicyChanged) -> PolicyEngine | None:
        """The bundle a promote or rollback puts in force, if this gate can follow it (else None)."""
        if changed.change == "promote" and self.shadow is not None and self.shadow.revision == changed.revision:
            return self.shadow
        if changed.change == "rollback" and self.earlier and self.earlier[-1].revision == changed.revision:
            return self.earlier[-1]
        return None

    def apply(self, changed: PolicyChanged, stream_seq: int) -> str | None:
        """Fold one `policy.changed` event in; why it could not be followed, if it could not.

        A change this gate cannot follow (a promote of another shadow than its own: two changes
        decided at once by two gates) leaves its state as it was, and says so.
        """
        origin = f"events:{stream_seq}"
        if changed.change == "shadow":
            bundle = PolicyBundle(changed.files or {})
            candidate = self._candidates.pop(bundle.revision, None)
            if candidate is None:
                try:
                    candidate = PolicyEngine.from_bundle(bundle, origin)
                except (PolicyLoadError, PolicyBundleError) as exc:
                    return f"the shadow bundle of {origin} does not load here: {exc}"
            self.shadow = candidate
            self._candidates.clear()
            return None
        following = self.next_active(changed)
        if following is None:
            return (
                f"cannot follow the {changed.change} to {changed.revision} ({origin}): this gate holds no such bundle"
            )
        if changed.change == "promote":
            self.earlier.append(self.active)
            self.shadow = None
        else:
            self.earlier.pop()
        self.active, self.origin = following, origin
        return None
