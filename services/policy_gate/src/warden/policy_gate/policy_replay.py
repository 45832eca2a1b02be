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

import concurrent.futures
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
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


def _chunks(decisions: Sequence[RecordedDecision]) -> Iterator[list[RecordedDecision]]:
    for start in range(0, len(decisions), CHUNK):
        yield list(decisions[start : start + CHUNK])


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
    started = time.perf_counter()
    engine = PolicyEngine.load(candidate)  # fails here, once, with the file and line, if it cannot load
    report = PolicyReplayReport(candidate_revision=engine.revision)
    judged = [decision for decision in decisions if decision.input is not None]
    report.without_input = len(decisions) - len(judged)
    workers = default_workers() if workers is None else workers
    chunks = list(_chunks(judged))
    if workers <= 1 or len(judged) < IN_PROCESS_BELOW:
        outcomes: Iterator[list[tuple[str, tuple[str, ...]]]] = (
            [judge_input(engine, d.input) for d in chunk if d.input is not None] for chunk in chunks
        )
        _compare_all(report, chunks, outcomes, len(judged), progress)
    else:
        # Spawned, not forked: a fork would copy this process's engine, bound to its thread.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_load_worker, initargs=(str(candidate),)
        ) as pool:
            inputs = ([d.input for d in chunk if d.input is not None] for chunk in chunks)
            _compare_all(report, chunks, pool.map(_judge_chunk, inputs), len(judged), progress)
    report.seconds = time.perf_counter() - started
    return report


def _compare_all(
    report: PolicyReplayReport,
    chunks: Sequence[Sequence[RecordedDecision]],
    outcomes: Iterator[list[tuple[str, tuple[str, ...]]]],
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    for chunk, results in zip(chunks, outcomes, strict=True):
        for recorded, (effect, reasons) in zip(chunk, results, strict=True):
            report.replayed += 1
            if effect == recorded.effect and reasons == recorded.reasons:
                report.unchanged += 1
            else:
                report.flips.append(Flip(recorded, effect, reasons))
        if progress is not None:
            progress(report.replayed, total)
