"""Run an agent runner: `python -m services.agent_runner`."""

from services.agent_runner.app import main

main()
