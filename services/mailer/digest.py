"""The digest: once a month (default: first Monday, 09:00 Europe/Berlin) each active subscriber who
wants events gets one mail listing the upcoming events in their regions and topics. Nobody gets an
empty digest: who has no matching event is not a recipient."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from shared.dates import when
from shared.i18n import Translations
from shared.messages import EventSnapshot

BERLIN = ZoneInfo("Europe/Berlin")
EVENTS_TOPIC = "veranstaltungen"
NAMESPACE = uuid.UUID("6f1c3a52-9d8e-4b1e-9c59-1f3f8e0b7d21")


def wants_events(topics: list[str]) -> bool:
    return not topics or EVENTS_TOPIC in topics


def relevant(event: EventSnapshot, regions: list[str], topics: list[str]) -> bool:
    """An event in one of their regions (or state-wide), on one of their topics (if they chose any)."""
    in_region = not regions or event.region in regions or event.region == "landesweit"
    chosen = set(topics) - {EVENTS_TOPIC}
    on_topic = not chosen or bool(chosen & set(event.topics))
    return in_region and on_topic


def due_time(year: int, month: int, weekday: int, hour: int) -> datetime:
    """The first `weekday` of the month at `hour`, Europe/Berlin."""
    first = date(year, month, 1)
    day = first + timedelta(days=(weekday - first.weekday()) % 7)
    return datetime(day.year, day.month, day.day, hour, tzinfo=BERLIN)


def period_id(period: str) -> str:
    """The same campaign id for the same month: starting the digest twice is impossible."""
    return str(uuid.uuid5(NAMESPACE, f"digest:{period}"))


def body(events: list[EventSnapshot], lang: str, tr: Translations) -> str:
    from services.mailer.eventmail import literal
    lines = [tr.gettext(lang, "mail.digest.intro"), ""]
    for event in events:
        title = event.title.get(lang) or event.title["de"]
        place = event.location.name if event.location else tr.gettext(lang, "events.online")
        lines += [f"**{literal(title)}**  ", f"{when(event.starts_at, event.ends_at, lang)} · {literal(place)}  ",
                  f"[{tr.gettext(lang, 'mail.event.details')}]({event.url}?lang={lang})", ""]
    return "\n".join(lines)
