"""Mail scanners (safe-links services, virus scanners, previews) open every link of a mail with GET, often
several times, before the person reads it. GET on any link of any mail the system sends changes nothing:
not a subscriber's status, not the consent log, not a registration; only a POST acts."""

from __future__ import annotations

import re
from email.message import EmailMessage
from html import unescape
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.conftest import PUBLISHER_KEY, Stack, html_part, text_part

URL = re.compile(r"https?://[^\s<>\"')\]]+")


def links(mail: EmailMessage) -> set[str]:
    """Every URL a scanner would follow: in the text part, the HTML part's attributes, List-Unsubscribe."""
    found = set(URL.findall(text_part(mail)))
    found |= {unescape(u) for u in re.findall(r'(?:href|src)="([^"]+)"', html_part(mail))}
    found |= set(URL.findall(mail.get("List-Unsubscribe", "")))
    return {u.rstrip(".,;") for u in found if u.startswith("http")}


def client_for(stack: Stack, url: str) -> httpx.AsyncClient | None:
    """Our own services by the host the links are built with (PUBLIC_BASE_URL, the events' public URL);
    None for anything else (an online event's meeting link)."""
    return {"bridgepost.test": stack.subscriptions, "events.test": stack.events}.get(urlsplit(url).hostname or "")


async def scan(stack: Stack, mails: list[EmailMessage]) -> set[str]:
    """GET every link of these mails twice, as scanners do; returns the paths followed."""
    followed = set()
    for mail in mails:
        for url in links(mail):
            client = client_for(stack, url)
            if client is None:
                continue
            parts = urlsplit(url)
            for _ in range(2):
                r = await client.get(parts.path + (f"?{parts.query}" if parts.query else ""),
                                     headers={"User-Agent": "SafeLinks-Scanner/1.0"})
                assert r.status_code in (200, 303, 404), (url, r.status_code, r.text[:300])
            followed.add(parts.path)
    return followed


async def state(stack: Stack, addresses: list[str], event_id: str | None = None) -> dict[str, Any]:
    """What a GET must not change: each subscriber's status, profile and consent log, the event's
    registrations."""
    out: dict[str, Any] = {}
    for addr in addresses:
        r = await stack.subscriptions.get("/api/v1/subscribers", params={"email": addr}, headers=stack.staff())
        items = r.json()["items"]
        if not items:
            out[addr] = None
            continue
        (sub,) = items
        export = (await stack.subscriptions.get(f"/api/v1/subscribers/{sub['id']}/export",
                                                headers=stack.staff())).json()
        out[addr] = (export["subscriber"], [(e["action"], e["occurred_at"]) for e in export["consent_log"]])
    if event_id:
        r = await stack.events.get(f"/api/v1/events/{event_id}/registrations", headers=stack.staff(PUBLISHER_KEY))
        out["registrations"] = [(i["email"], i["status"], i["waitlist_position"]) for i in r.json()["items"]]
        out["event"] = (await stack.events.get(f"/api/v1/events/{event_id}")).json()
    return out


async def test_following_every_link_of_every_mail_changes_nothing(stack: Stack) -> None:
    region, language = "altmarkkreis-salzwedel", "uk"
    segment = {"regions": [region], "languages": [language]}
    reader = stack.address("scanned-reader")
    assert (await stack.signup(reader, name="Oksana", language=language, regions=[region])).status_code == 202

    # 1. The double opt-in confirmation: opening its link shows a button, it does not confirm.
    (confirmation,) = await stack.smtp.wait_for(reader)
    before = await state(stack, [reader])
    followed = await scan(stack, [confirmation])
    assert "/confirm" in followed
    assert await state(stack, [reader]) == before and before[reader][0]["status"] == "pending"
    assert (await stack.confirm(reader)).status_code == 200  # the POST confirms; the token was not used up

    # 2. The welcome mail: unsubscribe and preference links.
    welcome = (await stack.smtp.wait_for(reader, 2))[1]
    before = await state(stack, [reader])
    assert {"/unsubscribe", "/preferences"} <= await scan(stack, [welcome])
    assert await state(stack, [reader]) == before and before[reader][0]["status"] == "active"

    # 3. An event: the announcement to the reader, registration confirmations, waiting list, the newsletter
    # opt-in a guest asked for when registering.
    async def counted() -> bool:
        r = await stack.mailer.post("/api/v1/segments/count", json={"segment": segment}, headers=stack.staff())
        return r.json()["count"] >= 1
    await stack.until(counted, what="the reader in the mailer's audience")
    created = await stack.events.post("/api/v1/events", headers=stack.staff(), json={
        "kind": "training", "title": {"de": "Fortbildung Interkulturelle Öffnung"}, "capacity": 1,
        "starts_at": "2031-09-09T09:00", "ends_at": "2031-09-09T16:00", "region": region,
        "location": {"name": "Kulturhaus", "address": "Salzwedel"}, "online_url": "https://meet.example.org/x",
        "announce": True, "segment": segment})
    event_id = created.json()["event_id"]
    assert (await stack.events.post(f"/api/v1/events/{event_id}/publish", headers=stack.staff())).status_code == 200
    guest, waiting = stack.address("scanned-guest"), stack.address("scanned-waiting")
    for addr, newsletter in ((guest, True), (waiting, False)):
        r = await stack.events.post(f"/api/v1/events/{event_id}/registrations", headers={"X-Forwarded-For": stack.ip()},
                                    json={"email": addr, "name": "Gast", "language": "de", "newsletter": newsletter})
        assert r.status_code == 201, r.text
    guest_mails = await stack.smtp.wait_for(guest, 2)  # registration + the newsletter's confirmation
    waiting_mails = await stack.smtp.wait_for(waiting, 1)
    announcement = (await stack.smtp.wait_for(reader, 3, timeout=60))[2]
    addresses = [reader, guest, waiting]
    before = await state(stack, addresses, event_id)
    assert [s for _e, s, _p in before["registrations"]] == ["confirmed", "waitlisted"]
    followed = await scan(stack, [*guest_mails, *waiting_mails, announcement])
    assert {"/registrations/cancel", f"/events/{event_id}", "/confirm", "/unsubscribe"} <= followed, followed
    assert await state(stack, addresses, event_id) == before

    # 4. A newsletter issue.
    campaign = await stack.mailer.post("/api/v1/campaigns", headers=stack.staff(), json={
        "subject": {"de": "Neuigkeiten"}, "segment": segment,
        "body_markdown": {"de": "Hallo {{ name }}. [Einstellungen]({{ preferences_url }}) "
                                "[Abmelden]({{ unsubscribe_url }})"}})
    campaign_id = campaign.json()["id"]
    assert (await stack.mailer.post(f"/api/v1/campaigns/{campaign_id}/send", headers=stack.staff())).status_code == 200
    newsletter = (await stack.smtp.wait_for(reader, 4, timeout=60))[3]
    assert newsletter["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    before = await state(stack, addresses, event_id)
    assert {"/unsubscribe", "/preferences"} <= await scan(stack, [newsletter])
    assert await state(stack, addresses, event_id) == before

    # Every mail of this test was scanned, and all of them again: nothing changed. Now the POSTs act.
    assert await state(stack, addresses, event_id) == before
    (cancel_link,) = [u for m in guest_mails for u in links(m) if "/registrations/cancel" in u]
    cancelled = await stack.events.post(urlsplit(cancel_link).path + "?" + urlsplit(cancel_link).query)
    assert cancelled.status_code == 200
    one_click = await stack.subscriptions.post(
        urlsplit(newsletter["List-Unsubscribe"].strip("<>")).path + "?" + urlsplit(
            newsletter["List-Unsubscribe"].strip("<>")).query,
        content="List-Unsubscribe=One-Click", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert one_click.status_code == 200
    after = await state(stack, addresses, event_id)
    assert after[reader][0]["status"] == "unsubscribed"
    assert [s for _e, s, _p in after["registrations"]] == ["cancelled", "confirmed"]  # the waiting guest moved up
