"""What a candidate policy bundle would have decided: recorded decisions re-evaluated, and the ones that flip.

Each recorded decision carries the policy input it was made on (see docs/policy.md), so a
candidate bundle can be judged against real history before it ships: `warden policy replay
--candidate DIR` re-decides every recorded input with the gate's own decision rules
(`decide.judge_input`, the same code the gate runs) on the candidate, and reports each decision whose
effect or reasons would change. It exits non-zero when an effect flips, so a CI job can hold a
policy change to the history it would rewrite.

Rego evaluation is CPU-bound and regorus engines are bound to their thread, so the stored events
go to worker processes (one engine each) in chunks, as read: each worker parses its events, judges
their inputs and compares, and hands back only counts and the decisions that changed. The process
that reads does nothing else per decision, since on a few CPUs it is the one every worker waits on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warden.decision_history import RecordedDecision, decision_from_event
from warden.policy_gate.decide import judge_input
from warden.policy_gate.engine import PolicyEngine

# Events sent to a worker at once: large enough that the hand-off costs little per decision,
# small enough that progress is smooth and every worker gets a share of a short history.
CHUNK = 1000
# Below this many decisions, starting worker processes costs more than it saves.
IN_PROCESS_BELOW = 2_000


@dataclass(frozen=True)
class Flip:
    """A recorded decision the candidate decides otherwise."""

    recorded: RecordedDecision
    effect: str
    reasons: tuple[str, ...]

    @property
    def effect_flipped(self) -> bool:
        return self.effect != self.recorded.effect

    def as_json(self) -> dict[str, Any]:
        recorded = self.recorded
        return {
            "decision_id": recorded.decision_id,
            "tenant": recorded.tenant,
            "run_id": recorded.run_id,
            "request_type": recorded.request_type,
            "time": recorded.time,
            "stream_seq": recorded.stream_seq,
            "recorded": {
                "effect": recorded.effect,
                "reasons": list(recorded.reasons),
                "policy_revision": recorded.policy_revision,
            },
            "candidate": {"effect": self.effect, "reasons": list(self.reasons)},
            "change": "effect" if self.effect_flipped else "reasons",
        }


@dataclass
class PolicyReplayReport:
    """What replaying the recorded decisions on a candidate found."""

    candidate_revision: str
    replayed: int = 0
    unchanged: int = 0
    # Decisions recorded without their input (made before inputs were recorded): not judged.
    without_input: int = 0
    # Messages on a decision subject that are not a well-formed decision event (none, normally).
    unreadable: int = 0
    flips: list[Flip] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def effect_flips(self) -> list[Flip]:
        return [flip for flip in self.flips if flip.effect_flipped]

    @property
    def reason_changes(self) -> list[Flip]:
        return [flip for flip in self.flips if not flip.effect_flipped]

    def transitions(self) -> Counter[str]:
        """Effect flips counted by direction, e.g. {"allow -> deny": 3}."""
        return Counter(f"{flip.recorded.effect} -> {flip.effect}" for flip in self.effect_flips)

    @property
    def decisions_per_second(self) -> float:
        return self.replayed / self.seconds if self.seconds > 0 else 0.0

    def add(self, judged: Judged) -> None:
        self.replayed += judged.replayed
        self.unchanged += judged.unchanged
        self.without_input += judged.without_input
        self.unreadable += judged.unreadable
        self.flips.extend(judged.flips)

    def as_json(self) -> dict[str, Any]:
        return {
            "candidate_revision": self.candidate_revision,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "effect_flips": len(self.effect_flips),
            "reason_changes": len(self.reason_changes),
            "without_input": self.without_input,
            "unreadable": self.unreadable,
            "transitions": dict(sorted(self.transitions().items())),
            "seconds": round(self.seconds, 3),
            "decisions_per_second": round(self.decisions_per_second),
            "flips": [flip.as_json() for flip in self.flips],
        }


@dataclass
class Judged:
    """What judging a chunk of stored decision events found: counts, and only the decisions that changed."""

    replayed: int = 0
    unchanged: int = 0
    without_input: int = 0
    unreadable: int = 0
    flips: list[Flip] = field(default_factory=list)


StoredEvent = tuple[int, bytes]


def judge_events(engine: PolicyEngine, events: Sequence[StoredEvent]) -> Judged:
    """Parse each stored decision event, judge its input on `engine`, compare with what was recorded."""
    judged = Judged()
    for stream_seq, body in events:
        recorded = decision_from_event(stream_seq, body)
        if recorded is None:
            judged.unreadable += 1
        elif recorded.input is None:
            judged.without_input += 1
        else:
            effect, reasons = judge_input(engine, recorded.input)
            judged.replayed += 1
            if effect == recorded.effect and reasons == recorded.reasons:
                judged.unchanged += 1
            else:
                judged.flips.append(Flip(recorded, effect, reasons))
    return judged


# The candidate engine of this worker process (one per process: regorus engines are bound to a thread).
_worker_engine: PolicyEngine | None = None


def _load_worker(candidate: str) -> None:
    global _worker_engine  # noqa: PLW0603 (a process pool's initializer can hand state to its tasks no other way)
    _worker_engine = PolicyEngine.load(Path(candidate))


def _ready() -> None:
    """Nothing: a task that makes the pool start a worker process (which loads the candidate)."""


def _judge_chunk(events: Sequence[StoredEvent]) -> Judged:
    assert _worker_engine is not None, "the pool's initializer loads the engine"
    return judge_events(_worker_engine, events)


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


class PolicyReplay:
    """Re-decides stored decision events on a candidate bundle as they are handed in, then reports.

    Events may be added while they are still being read: chunks go to the worker processes as
    they fill, so reading, starting the workers and judging overlap. Up to `IN_PROCESS_BELOW`
    events are judged in this process (starting workers would cost more); the workers start
    once that many are waiting. Use as a context manager, or call `close`.
    """

    def __init__(
        self, candidate: Path, *, workers: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> None:
        self.started = time.perf_counter()
        self.candidate = candidate
        # Loaded here even when workers judge: a candidate that does not load fails at once, naming
        # the file and line, rather than in every worker.
        self.engine = PolicyEngine.load(candidate)
        self.report = PolicyReplayReport(candidate_revision=self.engine.revision)
        self.workers = default_workers() if workers is None else workers
        self.progress = progress
        self.added = 0
        self._waiting: list[StoredEvent] = []
        self._judging: collections.deque[concurrent.futures.Future[Judged]] = collections.deque()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> PolicyReplay:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def reading(self, read: int, total: int) -> None:
        """How far the read has got (a reader's progress callback): once it is known that `total`
        decisions are coming, the workers start if they are worth it, while the read goes on."""
        if self._pool is None and self.workers > 1 and total >= IN_PROCESS_BELOW:
            self._start_workers()

    def add(self, stream_seq: int, body: bytes) -> None:
        """One stored decision event, as read from the stream."""
        self.added += 1
        self._waiting.append((stream_seq, body))
        if self._pool is None and self.workers > 1 and len(self._waiting) >= IN_PROCESS_BELOW:
            self._start_workers()
        if self._pool is not None and len(self._waiting) >= CHUNK:
            self._judging.append(self._pool.submit(_judge_chunk, self._waiting))
            self._waiting = []
            self._collect_done()

    def _start_workers(self) -> None:
        # Spawned, not forked: a fork would copy this process's engine, bound to its thread.
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_worker,
            initargs=(str(self.candidate),),
        )
        # A spawning pool starts a process per task it cannot hand to an idle one: a task each
        # starts them all now, so they load the candidate while the first chunk is still being read.
        for _ in range(self.workers):
            self._pool.submit(_ready)

    def _collect_done(self, *, wait: bool = False) -> None:
        """Take in the judged chunks at the front of the queue (all of them, waiting, if `wait`)."""
        while self._judging and (wait or self._judging[0].done()):
            self._take(self._judging.popleft().result())

    def _take(self, judged: Judged) -> None:
        self.report.add(judged)
        if self.progress is not None:
            self.progress(self.report.replayed, self.added)

    def finish(self) -> PolicyReplayReport:
        """Judge what is left and wait for the workers: the whole report, its flips in stream order."""
        if self._pool is None:
            for start in range(0, len(self._waiting), CHUNK):
                self._take(judge_events(self.engine, self._waiting[start : start + CHUNK]))
        elif self._waiting:
            self._judging.append(self._pool.submit(_judge_chunk, self._waiting))
        self._waiting = []
        self._collect_done(wait=True)
        self.report.seconds = time.perf_counter() - self.started
        return self.report

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def replay_events(
    events: Iterable[StoredEvent],
    candidate: Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PolicyReplayReport:
    """Judge the input of every stored decision event on the candidate bundle in `candidate` and compare.

    Raises PolicyLoadError (naming the file) when the candidate does not load.
    """
    with PolicyReplay(candidate, workers=workers, progress=progress) as replay:
        if isinstance(events, Sequence):
            replay.reading(0, len(events))
        for stream_seq, body in events:
            replay.add(stream_seq, body)
        return replay.finish()
