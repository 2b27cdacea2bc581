"""Row and event ids are UUIDv7 (shared/ids.py): unique, and in the order they were made."""

from __future__ import annotations

import time
import uuid

from shared import messages
from shared.ids import new_id, uuid7


def test_uuid7_layout() -> None:
    before = time.time_ns() // 1_000_000
    made = uuid7()
    after = time.time_ns() // 1_000_000
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after  # the first 48 bits: Unix time in milliseconds


def test_ids_of_later_milliseconds_sort_later_as_text() -> None:
    """The property the indexes need: an id made later sorts after, as the text our columns hold."""
    ids = []
    for _ in range(5):
        ids.append(new_id())
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert all(len(i) == 36 and uuid.UUID(i).version == 7 for i in ids)


def test_ids_are_unique_within_one_millisecond() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    # 74 random bits: ids of the same millisecond differ in more than a counter would.
    same_ms = [i for i in ids if i[:13] == ids[0][:13]]
    assert len({i[15:18] for i in same_ms}) > 1 or len(same_ms) == 1


def test_events_carry_uuid7_ids() -> None:
    event = messages.MailSent(subscriber_id=new_id(), mail_id=new_id(), kind="confirmation", message_id="<m@x>")
    assert event.event_id.version == 7
