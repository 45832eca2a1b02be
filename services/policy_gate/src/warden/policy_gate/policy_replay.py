"""What a candidate policy bundle would have decided: recorded decisions re-evaluated, and the ones that flip.

Each recorded decision carries the policy input it was made on (see docs/policy.md), so a
candidate bundle can be judged against real history before it ships: `warden policy replay
--candidate DIR` re-decides every recorded input with the gate's own decision rules
(`decide.judge_input`, the same code the gate runs) on the candidate, and reports each decision whose
effect or reasons would change. It exits non-zero when an effect flips, so a CI job can hold a
policy change to the history it would rewrite.

Rego evaluation is CPU-bound and regorus engines are bound to their thread, so the inputs are
judged in worker processes (one engine each), in chunks; the comparison stays here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warden.decision_history import RecordedDecision
from warden.policy_gate.decide import judge_input
from warden.policy_gate.engine import PolicyEngine

# Inputs sent to a worker at once: large enough that the hand-off costs little per decision,
# small enough that progress is smooth and every worker gets a share of a short history.
CHUNK = 500
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

    def as_json(self) -> dict[str, Any]:
        return {
            "candidate_revision": self.candidate_revision,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "effect_flips": len(self.effect_flips),
            "reason_changes": len(self.reason_changes),
            "without_input": self.without_input,
            "transitions": dict(sorted(self.transitions().items())),
            "seconds": round(self.seconds, 3),
            "decisions_per_second": round(self.decisions_per_second),
            "flips": [flip.as_json() for flip in self.flips],
        }


# The candidate engine of this worker process (one per process: regorus engines are bound to a thread).
_worker_engine: PolicyEngine | None = None


def _load_worker(candidate: str) -> None:
    global _worker_engine  # noqa: PLW0603 (a process pool's initializer can hand state to its tasks no other way)
    _worker_engine = PolicyEngine.load(Path(candidate))


def _judge_chunk(inputs: Sequence[dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    assert _worker_engine is not None, "the pool's initializer loads the engine"
    return [judge_input(_worker_engine, document) for document in inputs]


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


Outcome = tuple[str, tuple[str, ...]]


class PolicyReplay:
    """Re-decides recorded decisions on a candidate bundle as they are handed in, then reports.

    Decisions may be added while they are still being read: chunks go to the worker processes as
    they fill, so reading, starting the workers and judging overlap. Up to `IN_PROCESS_BELOW`
    decisions are judged in this process (starting workers would cost more); the workers start
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
        self._waiting: list[RecordedDecision] = []
        self._judging: collections.deque[tuple[list[RecordedDecision], concurrent.futures.Future[list[Outcome]]]] = (
            collections.deque()
        )
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> PolicyReplay:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add(self, decision: RecordedDecision) -> None:
        self.added += 1
        if decision.input is None:
            self.report.without_input += 1
            return
        self._waiting.append(decision)
        if self._pool is None and self.workers > 1 and len(self._waiting) >= IN_PROCESS_BELOW:
            # Spawned, not forked: a fork would copy this process's engine, bound to its thread.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_load_worker,
                initargs=(str(self.candidate),),
            )
        if self._pool is not None:
            while len(self._waiting) >= CHUNK:
                self._submit(self._waiting[:CHUNK])
                del self._waiting[:CHUNK]
            self._compare_done()

    def _submit(self, chunk: list[RecordedDecision]) -> None:
        assert self._pool is not None
        inputs = [decision.input for decision in chunk if decision.input is not None]
        self._judging.append((chunk, self._pool.submit(_judge_chunk, inputs)))

    def _compare_done(self, *, wait: bool = False) -> None:
        """Compare the judged chunks at the front of the queue (all of them, waiting, if `wait`)."""
        while self._judging and (wait or self._judging[0][1].done()):
            chunk, outcomes = self._judging.popleft()
            self._compare(chunk, outcomes.result())

    def _compare(self, chunk: Sequence[RecordedDecision], outcomes: Sequence[Outcome]) -> None:
        report = self.report
        for recorded, (effect, reasons) in zip(chunk, outcomes, strict=True):
            report.replayed += 1
            if effect == recorded.effect and reasons == recorded.reasons:
                report.unchanged += 1
            else:
                report.flips.append(Flip(recorded, effect, reasons))
        if self.progress is not None:
            self.progress(report.replayed, self.added - report.without_input)

    def finish(self) -> PolicyReplayReport:
        """Judge what is left and wait for the workers: the whole report."""
        if self._pool is None:
            for start in range(0, len(self._waiting), CHUNK):
                chunk = self._waiting[start : start + CHUNK]
                self._compare(chunk, [judge_input(self.engine, d.input) for d in chunk if d.input is not None])
        elif self._waiting:
            self._submit(self._waiting)
        self._waiting = []
        self._compare_done(wait=True)
        self.report.seconds = time.perf_counter() - self.started
        return self.report

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def replay_decisions(
    decisions: Sequence[RecordedDecision],
    candidate: Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PolicyReplayReport:
    """Judge every recorded decision's input on the candidate bundle in `candidate` and compare.

    Raises PolicyLoadError (naming the file) when the candidate does not load.
    """
    with PolicyReplay(candidate, workers=workers, progress=progress) as replay:
        for decision in decisions:
            replay.add(decision)
        return replay.finish()
