"""Run the policy gate: `python -m services.policy_gate`."""

from services.policy_gate.app import main

main()
