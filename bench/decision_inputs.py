"""What recording a decision's policy input costs the gate, per decision, beside the decision itself.

    python -m bench.decision_inputs [--decisions N]

Times, for a tool call of the shipped pack: the decision as the gate makes it (evaluated, input
recorded and hashed, signed) and the same decision with the input left out (what the gate did
before inputs were recorded), each then serialised as the event the gate publishes; and a
shadow evaluation (a second engine judging the same request, as shadow mode does after each
decision). Alternating rounds, so neither order nor a growing heap favours one side.
Writes bench/results/decision_inputs.json.
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing

from warden.messages import ToolCallRequested, make_envelope
from warden.policy_gate.decide import Judgement, PolicyDecider
from warden.policy_gate.engine import SHIPPED_POLICY_DIR, PolicyEngine
from warden.signing import DecisionSigner

RESULTS = Path(__file__).with_name("results")


class InputLeftOut(PolicyDecider):
    """Decides as the gate does, but records no input: the cost before inputs were kept."""

    def judge(self, engine: PolicyEngine, envelope: Any, approval: Any = None) -> Judgement:
        judged = super().judge(engine, envelope, approval)
        return Judgement(judged.effect, judged.reasons, None, judged.expires_at, judged.approves)


def run(decisions: int) -> dict[str, Any]:
    signer = DecisionSigner(nacl.signing.SigningKey.generate())
    engine = PolicyEngine.load(SHIPPED_POLICY_DIR)
    candidate = PolicyEngine.load(SHIPPED_POLICY_DIR)
    request = make_envelope(
        ToolCallRequested(
            tool_call_id="tc1-0123456789abcdef0123456789abcdef",
            step=1,
            agent="demo",
            tool="web.fetch",
            arguments={"url": "https://example.com/answers"},
        ),
        tenant="acme",
        entity_id="01a2350f-388e-7fe2-a1a5-27549fcaac8f",
        actor="alice",
        source="bench",
    )
    recording, leaving_out = PolicyDecider(engine, signer), InputLeftOut(engine, signer)

    def published(decider: PolicyDecider) -> None:
        verdict = decider.decide(request, request_seq=1)
        make_envelope(verdict, tenant="acme", entity_id=request.entity_id, actor="gate", source="gate").to_bytes()

    cases: dict[str, Callable[[], object]] = {
        "with_input": lambda: published(recording),
        "without_input": lambda: published(leaving_out),
        "shadow_judgement": lambda: recording.judge(candidate, request),
    }
    for case in cases.values():
        case()  # warm up each engine's compiled VM
    totals = dict.fromkeys(cases, 0.0)
    rounds = 10
    per_round = decisions // rounds
    for _ in range(rounds):
        for label, case in cases.items():
            started = time.perf_counter()
            for _ in range(per_round):
                case()
            totals[label] += time.perf_counter() - started
    us = {label: total / (per_round * rounds) * 1e6 for label, total in totals.items()}
    sizes = {
        "with_input": len(recording.decide(request, request_seq=1).model_dump_json()),
        "without_input": len(leaving_out.decide(request, request_seq=1).model_dump_json()),
    }
    return {
        "decisions": per_round * rounds,
        "decision_with_input_us": round(us["with_input"], 1),
        "decision_without_input_us": round(us["without_input"], 1),
        "input_recording_us": round(us["with_input"] - us["without_input"], 1),
        "shadow_judgement_us": round(us["shadow_judgement"], 1),
        "decision_bytes_with_input": sizes["with_input"],
        "decision_bytes_without_input": sizes["without_input"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    result = run(parser.parse_args().decisions)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decision_inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
