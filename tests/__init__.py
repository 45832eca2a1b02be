"""Warden's test suite: real NATS JetStream and Postgres, embedded unless URLs are given."""
