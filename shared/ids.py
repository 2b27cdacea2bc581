"""Identifiers of the rows and events we create: UUIDv7 (RFC 9562, section 5.7).

A UUIDv7 starts with its creation time in milliseconds, followed by 74 random bits. Ids made one after
another therefore sort one after another, and every index keyed by them (a subscriber's id in five tables,
a mail's id, the event ids of the outbox and of the processed-event markers, the dedupe keys built from
them) grows at its right edge: a transaction of a hundred sign-ups writes a handful of index pages instead
of a hundred scattered ones. With random (version 4) ids every insert lands on a different page once an
index outgrows the page cache, and both SQLite (WAL writes and checkpoints) and PostgreSQL (index pages
and their full-page writes) slow down as the tables grow.

They are as unique as version 4 ids and as hard to guess within a millisecond, but they tell when they were
made: use them for records, never as a secret (tokens come from `secrets`).
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION = 0x7 << 76
_VARIANT = 0x2 << 62
_RANDOM = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)  # the 80 low bits, less version and variant


def uuid7() -> uuid.UUID:
    """A new UUIDv7: 48 bits of Unix time in milliseconds, version, 74 random bits, variant."""
    milliseconds = time.time_ns() // 1_000_000
    random = int.from_bytes(os.urandom(10), "big") & _RANDOM
    return uuid.UUID(int=(milliseconds & 0xFFFF_FFFF_FFFF) << 80 | _VERSION | _VARIANT | random)


def new_id() -> str:
    """A new row id as text (36 characters, the form our String(36) id columns hold)."""
    return str(uuid7())
