"""The events service end to end: staff API → public pages/feed → registration, waiting list,
calendar invitations, change and cancellation notices, reminders — real broker, SMTP and databases."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import httpx
from icalendar import Calendar
from sqlalchemy import select

from services.events import store as events_store
from services.events.app import create_app as create_events
from tests.conftest import EDITOR_KEY, PUBLISHER_KEY, Stack, html_part, text_part


def future(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).replace(microsecond=0).isoformat()


def event_body(**over) -> dict:
    body = {
        "kind": "forum", "title": {"de": "Dialogforum Arbeitsmarkt", "ar": "منتدى الحوار", "en": "Dialogue forum"},
        "description": {"de": "Wir sprechen über Arbeit.\n\nMit Gästen.", "en": "We talk about work."},
        "starts_at": future(24 * 10), "ends_at": future(24 * 10 + 2),
        "location": {"name": "Bürgerhaus", "address": "Markt 1, 39576 Stendal"},
        "region": "stendal", "topics": ["arbeitsmarkt"], "capacity": 3,
        "segment": {"audiences": ["public"], "regions": ["stendal"]}, "announce": False,
    }
    body.update(over)
    return body


async def published(stack: Stack, **over) -> dict:
    r = await stack.events.post("/api/v1/events", json=event_body(**over), headers=stack.staff(EDITOR_KEY))
    assert r.status_code == 201, r.text
    event = r.json()
    p = await stack.events.post(f"/api/v1/events/{event['event_id']}/publish", headers=stack.staff(PUBLISHER_KEY))
    assert p.status_code == 200, p.text
    return p.json()


async def register(stack: Stack, event_id: str, email: str, **over) -> httpx.Response:
    body = {"email": email, "name": "Gast", "language": "de", **over}
    return await stack.events.post(f"/events/{event_id}/register", json=body,
                                   headers={"X-Forwarded-For": stack.ip()})


def calendar(msg) -> Calendar:
    parts = [p for p in msg.walk() if p.get_content_type() == "text/calendar"]
    assert len(parts) == 1, [p.get_content_type() for p in msg.walk()]
    assert parts[0].get_param("method") == Calendar.from_ical(parts[0].get_payload(decode=True))["METHOD"]
    return Calendar.from_ical(parts[0].get_payload(decode=True))


def vevent(cal: Calendar):
    (event,) = cal.walk("VEVENT")
    return event


async def test_draft_is_invisible_until_published_then_listed_paged_and_in_the_feed(stack: Stack) -> None:
    r = await stack.events.post("/api/v1/events", json=event_body(title={"de": "Entwurf Geheim"}),
                                headers=stack.staff(EDITOR_KEY))
    assert r.status_code == 201 and r.json()["status"] == "draft"
    event_id = r.json()["event_id"]
    assert (await stack.events.get(f"/events/{event_id}")).status_code == 404
    assert (await stack.events.get(f"/api/v1/events/{event_id}")).status_code == 404
    assert event_id not in (await stack.events.get("/events")).text
    assert "Entwurf Geheim" not in (await stack.events.get("/events.ics")).text
    staff_view = await stack.events.get(f"/api/v1/events/{event_id}", headers=stack.staff(EDITOR_KEY))
    assert staff_view.status_code == 200

    assert (await stack.events.post(f"/api/v1/events/{event_id}/publish",
                                    headers=stack.staff(PUBLISHER_KEY))).status_code == 200
    page = await stack.events.get(f"/events/{event_id}", headers={"Accept-Language": "ar"})
    assert page.status_code == 200 and 'dir="rtl"' in page.text and "منتدى الحوار" not in page.text  # title is de
    assert "Entwurf Geheim" in page.text and '<form method="post"' in page.text and "Bürgerhaus" in page.text
    listing = await stack.events.get("/events?region=stendal&topic=arbeitsmarkt&kind=forum&lang=en")
    assert event_id in listing.text
    assert event_id not in (await stack.events.get("/events?region=halle")).text
    assert event_id in [e["event_id"] for e in (await stack.events.get("/api/v1/events")).json()]
    feed = await stack.events.get("/events.ics?region=stendal")
    assert feed.headers["content-type"].startswith("text/calendar")
    uids = [str(e["UID"]) for e in Calendar.from_ical(feed.content).walk("VEVENT")]
    assert f"{event_id}@events.test" in uids
    assert event_id not in (await stack.events.get("/events.ics?topic=foerderung")).text


async def test_capacity_waiting_list_duplicates_cancellation_and_promotion(stack: Stack) -> None:
    event = await published(stack, capacity=2)
    eid = event["event_id"]
    a, b, c, d = (stack.address(t) for t in ("ev-a", "ev-b", "ev-c", "ev-d"))
    assert (r := await register(stack, eid, a, language="ar")).status_code == 201 and r.json()["status"] == "confirmed"
    assert (await register(stack, eid, b)).json()["status"] == "confirmed"
    c_answer = (await register(stack, eid, c)).json()
    assert c_answer["status"] == "waitlisted" and c_answer["position"] == 1
    assert (await register(stack, eid, d)).json()["position"] == 2
    again = await register(stack, eid, a.upper())  # the same address: no second place
    assert again.status_code == 200 and again.json()["status"] == "confirmed"

    (mail_a,) = await stack.smtp.wait_for(a)
    assert mail_a["Content-Language"] == "ar" and 'dir="rtl"' in html_part(mail_a)
    cal = calendar(mail_a)
    assert str(cal["METHOD"]) == "REQUEST"
    ev = vevent(cal)
    assert str(ev["UID"]) == f"{eid}@events.test" and int(ev["SEQUENCE"]) == 0
    assert ev["DTSTART"].dt == datetime.fromisoformat(event["starts_at"])
    assert "mailto:" + a in str(ev["ATTENDEE"]).lower() and str(ev["ORGANIZER"]).startswith("mailto:")
    (mail_c,) = await stack.smtp.wait_for(c)
    assert "1" in text_part(mail_c) and str(vevent(calendar(mail_c))["STATUS"]) == "TENTATIVE"

    # Cancel a's place through the signed link: GET shows a page and changes nothing, POST cancels.
    link = re.search(r"http://events\.test/registrations/cancel\?\S+", text_part(mail_a)).group(0)
    path = link.removeprefix("http://events.test")
    page = await stack.events.get(path)
    assert page.status_code == 200 and "<button" in page.text
    assert (await stack.events.get(f"/api/v1/events/{eid}")).json()["confirmed"] == 2
    token = re.search(r"token=([^&]+)", link).group(1)
    done = await stack.events.post("/registrations/cancel", data={"token": token})
    assert done.status_code == 200
    state = (await stack.events.get(f"/api/v1/events/{eid}")).json()
    assert state["confirmed"] == 2 and state["waitlisted"] == 1  # c moved up, d waits
    cancelled = (await stack.smtp.wait_for(a, 2))[1]
    assert str(calendar(cancelled)["METHOD"]) == "CANCEL"
    promoted = (await stack.smtp.wait_for(c, 2))[1]
    assert str(calendar(promoted)["METHOD"]) == "REQUEST" and str(vevent(calendar(promoted))["STATUS"]) == "CONFIRMED"
    assert (await stack.events.post("/registrations/cancel", data={"token": token + "x"})).status_code == 404

    listing = await stack.events.get(f"/api/v1/events/{eid}/registrations", headers=stack.staff(PUBLISHER_KEY))
    rows = listing.json()["items"]
    assert [r["status"] for r in rows] == ["cancelled", "confirmed", "confirmed", "waitlisted"]
    assert rows[3]["waitlist_position"] == 1
    csv_export = await stack.events.get(f"/api/v1/events/{eid}/registrations?format=csv",
                                        headers=stack.staff(PUBLISHER_KEY))
    assert csv_export.headers["content-type"].startswith("text/csv") and d in csv_export.text


async def test_fifty_at_once_for_ten_places_on_two_instances(stack: Stack) -> None:
    event = await published(stack, capacity=10)
    eid = event["event_id"]
    second = create_events(stack.events_settings)  # another instance on the same database and broker
    async with second.router.lifespan_context(second), httpx.AsyncClient(
            transport=httpx.ASGITransport(second, client=("127.0.0.1", 1)), base_url="http://events.test") as other:
        clients = [stack.events, other]
        answers = await asyncio.gather(*(
            clients[i % 2].post(f"/events/{eid}/register", json={"email": stack.address("rush"), "language": "de"})
            for i in range(50)))
    assert all(a.status_code == 201 for a in answers), {a.status_code for a in answers}
    statuses = [a.json()["status"] for a in answers]
    assert statuses.count("confirmed") == 10 and statuses.count("waitlisted") == 40
    assert sorted(a.json()["position"] for a in answers if a.json()["position"]) == list(range(1, 41))
    state = (await stack.events.get(f"/api/v1/events/{eid}")).json()
    assert (state["confirmed"], state["waitlisted"], state["places_left"]) == (10, 40, 0)


async def test_deadline_and_cancelled_events_refuse_registration_clearly(stack: Stack) -> None:
    closed = await published(stack, registration_deadline=future(-1), starts_at=future(5), ends_at=future(6))
    r = await register(stack, closed["event_id"], stack.address("late"))
    assert r.status_code == 409 and r.json()["detail"]["reason"] == "closed"
    page = await stack.events.post(f"/events/{closed['event_id']}/register",
                                   data={"email": stack.address("late"), "language": "de"})
    assert page.status_code == 409 and "Die Anmeldung für diese Veranstaltung ist geschlossen." in page.text
    event = await published(stack)
    await stack.events.post(f"/api/v1/events/{event['event_id']}/cancel", json={"message": {"de": "Krank."}},
                            headers=stack.staff(PUBLISHER_KEY))
    r = await register(stack, event["event_id"], stack.address("too-late"))
    assert r.status_code == 409 and r.json()["detail"]["reason"] == "cancelled"
    assert (await register(stack, "no-such-event", stack.address())).status_code == 404


async def test_change_and_cancellation_notices_with_growing_sequence(stack: Stack) -> None:
    event = await published(stack, capacity=1)
    eid = event["event_id"]
    guest, waiting = stack.address("notice"), stack.address("notice-wait")
    await register(stack, eid, guest, language="en")
    await register(stack, eid, waiting)
    await stack.smtp.wait_for(guest)
    await stack.smtp.wait_for(waiting)
    new_start, new_end = future(24 * 11), future(24 * 11 + 3)
    r = await stack.events.patch(f"/api/v1/events/{eid}", json={"starts_at": new_start, "ends_at": new_end,
                                                                 "location": {"name": "Rathaus", "address": "Stendal"}},
                                 headers=stack.staff(PUBLISHER_KEY))
    assert r.status_code == 200 and r.json()["sequence"] == 1
    changed = (await stack.smtp.wait_for(guest, 2))[1]
    assert "Rathaus" in text_part(changed) and changed["Subject"].startswith("Changed details")
    ev = vevent(calendar(changed))
    assert int(ev["SEQUENCE"]) == 1 and str(ev["UID"]) == f"{eid}@events.test"
    assert ev["DTSTART"].dt == datetime.fromisoformat(new_start)
    assert str(vevent(calendar((await stack.smtp.wait_for(waiting, 2))[1]))["STATUS"]) == "TENTATIVE"

    # A change that is neither time nor place: no notice, no new SEQUENCE.
    r = await stack.events.patch(f"/api/v1/events/{eid}", json={"description": {"de": "Neu beschrieben."}},
                                 headers=stack.staff(PUBLISHER_KEY))
    assert r.json()["sequence"] == 1

    r = await stack.events.post(f"/api/v1/events/{eid}/cancel", json={"message": {"en": "The speaker is ill."}},
                                headers=stack.staff(PUBLISHER_KEY))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    notice = (await stack.smtp.wait_for(guest, 3))[2]
    cal = calendar(notice)
    assert str(cal["METHOD"]) == "CANCEL" and int(vevent(cal)["SEQUENCE"]) == 2
    assert "The speaker is ill." in text_part(notice)
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(guest)) == 3  # nothing for the description change
    page = await stack.events.get(f"/events/{eid}")
    assert page.status_code == 200 and "Abgesagt" in page.text
    assert (await stack.events.patch(f"/api/v1/events/{eid}", json={"capacity": 5},
                                     headers=stack.staff(PUBLISHER_KEY))).status_code == 409


async def test_reminders_exactly_once_across_two_schedulers_and_a_restart(stack: Stack) -> None:
    event = await published(stack, starts_at=future(3), ends_at=future(4), capacity=None)
    guests = [stack.address("remind") for _ in range(4)]
    for g in guests:
        await register(stack, event["event_id"], g)
    for g in guests:
        await stack.smtp.wait_for(g)
    for _ in range(2):  # a second instance runs its own scheduler, then "restarts"
        second = create_events(stack.events_settings)
        async with second.router.lifespan_context(second):
            await asyncio.gather(second.state.events.emit_due_reminders(),
                                 stack.events_app.state.events.emit_due_reminders())
            await asyncio.sleep(1.0)
    for g in guests:
        reminders = await stack.smtp.wait_for(g, 2)
        assert reminders[1]["Subject"].startswith("Erinnerung")
    async with stack.events_app.state.db.sessions() as s:
        marked = (await s.scalars(select(events_store.registrations.c.reminder_due_at)
                                  .where(events_store.registrations.c.event_id == event["event_id"]))).all()
    assert all(marked)
    await asyncio.sleep(1.0)  # several scheduler rounds later
    assert [len(stack.smtp.to(g)) for g in guests] == [2] * len(guests)


async def test_registration_form_and_newsletter_opt_in(stack: Stack) -> None:
    event = await published(stack)
    guest = stack.address("form-guest")
    page = await stack.events.post(f"/events/{event['event_id']}/register", data={
        "email": guest, "name": "Olena", "language": "uk", "newsletter": "true"},
        headers={"X-Forwarded-For": "10.1.2.3", "User-Agent": "EventForm/1"})
    assert page.status_code == 201 and 'lang="uk"' in page.text
    mails = await stack.smtp.wait_for(guest, 2)  # the registration and the newsletter's double opt-in
    subjects = {m["Subject"] for m in mails}
    assert any("/confirm?" in text_part(m) for m in mails), subjects
    sub = await stack.subscriber(guest)
    assert sub["status"] == "pending" and sub["regions"] == ["stendal"] and sub["language"] == "uk"
    export = (await stack.subscriptions.get(f"/api/v1/subscribers/{sub['id']}/export", headers=stack.staff())).json()
    consent = export["consent_log"][0]
    assert consent["source"] == "event-registration" and consent["ip"] == "10.1.2.3"
    bad = await stack.events.post(f"/events/{event['event_id']}/register", data={"email": "nope", "language": "de"})
    assert bad.status_code == 422 and "Bitte geben Sie eine gültige E-Mail-Adresse ein." in bad.text


STAFF_ENDPOINTS = [
    ("POST", "/api/v1/events", "editor"),
    ("PATCH", "/api/v1/events/{id}", "publisher"),  # the event is published: changing it needs a publisher
    ("POST", "/api/v1/events/{id}/publish", "publisher"),
    ("GET", "/api/v1/events/{id}/registrations", "publisher"),
    ("POST", "/api/v1/events/{id}/cancel", "publisher"),
]


async def test_staff_endpoints_need_the_right_role(stack: Stack) -> None:
    event = await published(stack)
    keys = {"editor": EDITOR_KEY, "publisher": PUBLISHER_KEY}
    for method, path, role in STAFF_ENDPOINTS:
        url = path.format(id=event["event_id"])
        body = event_body() if method == "POST" and path == "/api/v1/events" else \
            {"capacity": 4} if method == "PATCH" else None
        assert (await stack.events.request(method, url, json=body)).status_code == 401
        bad = await stack.events.request(method, url, json=body, headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        if role == "publisher":
            weak = await stack.events.request(method, url, json=body, headers=stack.staff(EDITOR_KEY))
            assert weak.status_code == 403, (method, url, weak.text)
        ok = await stack.events.request(method, url, json=body, headers=stack.staff(keys[role]))
        assert ok.status_code in (200, 201), (method, url, ok.text)


async def test_bad_event_input_gets_422_with_field_errors(stack: Stack) -> None:
    cases = [
        ({"ends_at": future(1), "starts_at": future(2)}, "end_before_start"),
        ({"kind": "party"}, "unknown_kind"),
        ({"region": "atlantis"}, "unknown_region"),
        ({"capacity": -1}, "greater_than_equal"),
        ({"title": {"en": "Only English"}}, "german_required"),
        ({"topics": ["cooking"]}, "unknown_topic"),
        ({"location": None, "online_url": None}, "place_required"),
        ({"segment": {"groups": ["freunde"]}}, "unknown_group"),
        ({"starts_at": "tomorrow"}, "datetime_from_date_parsing"),
    ]
    for override, error_type in cases:
        r = await stack.events.post("/api/v1/events", json=event_body(**override), headers=stack.staff(EDITOR_KEY))
        assert r.status_code == 422, (override, r.text)
        assert error_type in {e["type"] for e in r.json()["detail"]}, (override, r.json())
    event = await published(stack)
    r = await stack.events.patch(f"/api/v1/events/{event['event_id']}", json={"ends_at": future(1)},
                                 headers=stack.staff(PUBLISHER_KEY))
    assert r.status_code == 422


async def test_html_in_event_text_is_escaped_on_pages_and_in_mails(stack: Stack) -> None:
    event = await published(stack, title={"de": "<script>alert('x')</script> Forum"})
    page = await stack.events.get(f"/events/{event['event_id']}")
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text
    guest = stack.address("xss-guest")
    await register(stack, event["event_id"], guest)
    (mail,) = await stack.smtp.wait_for(guest)
    assert "<script>alert" not in html_part(mail) and "&lt;script&gt;" in html_part(mail)
