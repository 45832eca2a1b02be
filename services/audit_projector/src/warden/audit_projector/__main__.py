"""Run the audit projector: `python -m warden.audit_projector`."""

from warden.audit_projector.app import main

main()
