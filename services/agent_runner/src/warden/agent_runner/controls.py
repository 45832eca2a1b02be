"""Where a run under way meets the cancels and halts in force: checked before every step and call."""

from typing import Any

from warden.controls import ControlFeed
from warden.messages import Envelope, RunCancelled, RunDispatched, make_envelope


class RunStopped(Exception):
    """The run is cancelled or its scope halted: it must end `cancelled`, starting nothing more."""

    def __init__(self, cancelled: RunCancelled) -> None:
        super().__init__(cancelled.reason)
        self.cancelled = cancelled


def check_not_stopped(feed: ControlFeed | None, work: Envelope[RunDispatched]) -> None:
    """Raise RunStopped when a cancel or halt in force covers this run: a dict look-up, no round trip."""
    if feed is None:
        return
    control = feed.view.stop(work.tenant, work.entity_id, work.data.agent)
    if control is not None:
        raise RunStopped(RunCancelled(reason=control.reason, decision_id=control.decision_id, control=control.kind))


def stopped_event(work: Envelope[Any], stop: RunStopped, source: str) -> Envelope[RunCancelled]:
    """The run's terminal event for a stop, caused by its work item."""
    return make_envelope(
        stop.cancelled, tenant=work.tenant, entity_id=work.entity_id, actor=source, source=source, caused_by=work
    )
