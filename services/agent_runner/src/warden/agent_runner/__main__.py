"""Run an agent runner: `python -m warden.agent_runner`."""

from warden.agent_runner.app import main

main()
