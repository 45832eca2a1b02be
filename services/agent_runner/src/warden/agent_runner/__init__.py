"""Agent runner service: runs agents step by step, asking the policy gate before every tool call."""
