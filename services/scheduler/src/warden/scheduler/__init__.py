"""Scheduler service: queues allowed runs and dispatches them within each tenant's concurrency limit."""
