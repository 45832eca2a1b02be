"""What a signed decision costs: the gate's signing and the runner's check, beside the decision itself.

    python -m bench.signing [--decisions N]

Signs N decisions as the gate does (binding, canonical JSON, Ed25519) and checks each as a runner
does, and times the policy decision they are attached to (the shipped pack, evaluated by regorus)
in the same run, so the cost is reported as a share of a decision as well as in microseconds.
Writes bench/results/signing.json.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import nacl.signing

from warden.messages import ToolCallRequested, make_envelope
from warden.policy_gate.decide import PolicyDecider
from warden.policy_gate.engine import SHIPPED_POLICY_DIR, PolicyEngine
from warden.signing import DecisionBinding, DecisionSigner, DecisionVerifier

RESULTS = Path(__file__).with_name("results")


class Unsigned(DecisionSigner):
    """Signs nothing: the decision's cost without a signature, for comparison."""

    def sign(self, binding: DecisionBinding) -> str:
        return ""


def run(decisions: int) -> dict[str, Any]:
    signer = DecisionSigner(nacl.signing.SigningKey.generate())
    verifier = DecisionVerifier([signer.public_key])
    engine = PolicyEngine.load(SHIPPED_POLICY_DIR)
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
    timings: dict[str, float] = {}
    deciders = {
        "decide_unsigned": PolicyDecider(engine, Unsigned(signer.key)),
        "decide_signed": PolicyDecider(engine, signer),
    }
    for decider in deciders.values():
        decider.decide(request, request_seq=1)  # warm up the engine
    # Alternating rounds, nothing kept: neither order nor a growing heap (the garbage collector
    # walks every object kept) favours one side.
    totals = dict.fromkeys(deciders, 0.0)
    rounds = 10
    for _ in range(rounds):
        for label, decider in deciders.items():
            started = time.perf_counter()
            for seq in range(1, decisions // rounds + 1):
                decider.decide(request, request_seq=seq)
            totals[label] += time.perf_counter() - started
    for label, total in totals.items():
        timings[label] = total / (decisions // rounds * rounds) * 1e6
    made = [deciders["decide_signed"].decide(request, request_seq=seq) for seq in range(1, 1001)]
    started = time.perf_counter()
    for verdict in made:
        assert verifier.refusal(verdict, "acme", request.entity_id) is None
    timings["verify"] = (time.perf_counter() - started) / len(made) * 1e6
    signing = timings["decide_signed"] - timings["decide_unsigned"]
    return {
        "decisions": decisions,
        "decide_unsigned_us": round(timings["decide_unsigned"], 1),
        "decide_signed_us": round(timings["decide_signed"], 1),
        "signing_us": round(signing, 1),
        "verify_us": round(timings["verify"], 1),
        "signed_to_unsigned_decision": round(timings["decide_signed"] / timings["decide_unsigned"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    result = run(parser.parse_args().decisions)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "signing.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"per decision: policy + envelope {result['decide_unsigned_us']} us, signing {result['signing_us']} us, "
        f"runner's check {result['verify_us']} us (signed / unsigned decision: {result['signed_to_unsigned_decision']})"
    )


if __name__ == "__main__":
    main()
