"""Run the scheduler: `python -m warden.scheduler`."""

from warden.scheduler.app import main

main()
