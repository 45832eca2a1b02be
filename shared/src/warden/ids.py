"""Unique, time-sortable identifiers (UUIDv7, RFC 9562) for events, runs and decisions."""

import os
import time
import uuid


def new_id() -> str:
    """Return a UUIDv7 string: millisecond timestamp first, so ids sort by creation time."""
    unix_ms = time.time_ns() // 1_000_000
    value = (unix_ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    # Set version 7 and the RFC 4122 variant bits in place of the random bits they occupy.
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))
