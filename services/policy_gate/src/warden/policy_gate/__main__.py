"""Run the policy gate: `python -m warden.policy_gate`."""

from warden.policy_gate.app import main

main()
