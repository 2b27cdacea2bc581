"""iCalendar (RFC 5545) for events: invitations (METHOD:REQUEST), cancellations (METHOD:CANCEL), feeds.

One stable UID per event, SEQUENCE from the event (it grows with every change of time or place), UTC
times, ORGANIZER and ATTENDEE as Google Calendar, Outlook and Apple Calendar expect in invitations.
"""

from __future__ import annotations

from datetime import datetime

from icalendar import Calendar, Event, vCalAddress, vText

from shared.messages import EventSnapshot, utcnow

PRODID = "-//bridgepost//events//DE"


def uid(event_id: str, domain: str) -> str:
    return f"{event_id}@{domain}"


def _vevent(event: EventSnapshot, language: str, domain: str, stamp: datetime) -> Event:
    v = Event()
    v.add("uid", uid(event.event_id, domain))
    v.add("dtstamp", stamp)
    v.add("sequence", event.sequence)
    v.add("dtstart", event.starts_at)
    v.add("dtend", event.ends_at)
    v.add("summary", event.title.get(language) or event.title["de"])
    description = event.description.get(language) or event.description.get("de") or ""
    v.add("description", f"{description}\n\n{event.url}".strip())
    v.add("url", event.url)
    if event.location:
        v.add("location", ", ".join(p for p in (event.location.name, event.location.address) if p))
    elif event.online_url:
        v.add("location", event.online_url)
    v.add("status", "CANCELLED" if event.status == "cancelled" else "CONFIRMED")
    return v


def invitation(event: EventSnapshot, language: str, organizer: str, organizer_name: str, attendee: str,
               attendee_name: str | None, domain: str, cancel: bool = False, tentative: bool = False) -> bytes:
    """A METHOD:REQUEST invitation (or METHOD:CANCEL) for one attendee."""
    cal = Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("calscale", "GREGORIAN")
    cal.add("method", "CANCEL" if cancel else "REQUEST")
    v = _vevent(event, language, domain, utcnow())
    if cancel:
        v["status"] = vText("CANCELLED")
    elif tentative:
        v["status"] = vText("TENTATIVE")
    org = vCalAddress(f"mailto:{organizer}")
    org.params["cn"] = vText(organizer_name)
    v["organizer"] = org
    att = vCalAddress(f"mailto:{attendee}")
    if attendee_name:
        att.params["cn"] = vText(attendee_name)
    att.params["role"] = vText("REQ-PARTICIPANT")
    att.params["partstat"] = vText("TENTATIVE" if tentative else "ACCEPTED")
    att.params["rsvp"] = vText("FALSE")
    v.add("attendee", att, encode=0)
    cal.add_component(v)
    return cal.to_ical()


def feed(events: list[EventSnapshot], language: str, domain: str, name: str) -> bytes:
    """A calendar that calendar applications subscribe to (METHOD:PUBLISH)."""
    cal = Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("calscale", "GREGORIAN")
    cal.add("method", "PUBLISH")
    cal.add("x-wr-calname", name)
    cal.add("x-wr-timezone", "Europe/Berlin")
    stamp = utcnow()
    for event in events:
        cal.add_component(_vevent(event, language, domain, stamp))
    return cal.to_ical()
