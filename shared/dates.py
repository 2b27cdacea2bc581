"""Event times as people read them: in the event's time zone, in their language (Babel/CLDR)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from babel.dates import format_date, format_time


def when(starts_at: datetime, ends_at: datetime, lang: str, zone: str = "Europe/Berlin") -> str:
    """'Donnerstag, 3. Dezember 2026, 18:00–20:00' (German), in `zone`."""
    tz = ZoneInfo(zone)
    start, end = starts_at.astimezone(tz), ends_at.astimezone(tz)
    day = format_date(start, "full", locale=lang)
    if start.date() == end.date():
        return f"{day}, {format_time(start, 'short', locale=lang)}–{format_time(end, 'short', locale=lang)}"
    return (f"{day}, {format_time(start, 'short', locale=lang)} – "
            f"{format_date(end, 'full', locale=lang)}, {format_time(end, 'short', locale=lang)}")
