"""Audit projector service: projects the JetStream audit trail into Postgres tables."""
