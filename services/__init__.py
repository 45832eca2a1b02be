"""Warden's services: each sub-package is one FastStream app run as its own process."""
