"""Run the audit projector: `python -m services.audit_projector`."""

from services.audit_projector.app import main

main()
