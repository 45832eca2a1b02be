"""Warden: an event-sourced control plane for AI agents on NATS JetStream and Postgres."""
