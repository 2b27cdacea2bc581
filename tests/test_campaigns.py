"""Campaigns end to end: segments, rendering safety, sending through mailer.jobs.v1, control."""

from __future__ import annotations

import asyncio
from html import unescape

import httpx
from hypothesis import given
from hypothesis import strategies as st

from services.mailer.segments import Member, matches
from shared.messages import Segment
from tests.conftest import EDITOR_KEY, PUBLISHER_KEY, Stack, html_part, manage_token, text_part

REGIONS = ["halle", "stendal", "harz"]
TOPICS = ["arbeitsmarkt", "bildung", "teilhabe"]
GROUPS = ["wirtschaft", "medien"]
LANGS = ["de", "ar", "en"]


def members():
    return st.builds(Member, audience=st.sampled_from(["public", "partner"]),
                     groups=st.frozensets(st.sampled_from(GROUPS)), regions=st.frozensets(st.sampled_from(REGIONS)),
                     topics=st.frozensets(st.sampled_from(TOPICS)), language=st.sampled_from(LANGS))


def segments():
    return st.builds(Segment, audiences=st.lists(st.sampled_from(["public", "partner"]), unique=True),
                     groups=st.lists(st.sampled_from(GROUPS), unique=True),
                     regions=st.lists(st.sampled_from(REGIONS), unique=True),
                     topics=st.lists(st.sampled_from(TOPICS), unique=True),
                     languages=st.lists(st.sampled_from(LANGS), unique=True))


@given(segments(), members())
def test_segment_is_and_across_dimensions_or_within(segment: Segment, m: Member) -> None:
    def dim(wanted, has, empty_means_all):
        return not wanted or (empty_means_all and not has) or bool(set(wanted) & has)

    expected = all([not segment.audiences or m.audience in segment.audiences,
                    dim(segment.groups, m.groups, False), dim(segment.regions, m.regions, True),
                    dim(segment.topics, m.topics, True), not segment.languages or m.language in segment.languages])
    assert matches(segment, m) == expected
    assert matches(Segment(), m)  # the empty segment is everybody
    # adding a value to a dimension never removes anyone who matched (OR within a dimension)
    if segment.regions and matches(segment, m):
        wider = segment.model_copy(update={"regions": [*segment.regions, "landesweit"]})
        assert matches(wider, m)


async def subscriber(stack: Stack, tag: str, **fields) -> str:
    addr = stack.address(tag)
    await stack.signup(addr, **fields)
    await stack.confirm(addr)
    await stack.smtp.wait_for(addr, 2)

    async def projected():
        r = await stack.mailer.post("/api/v1/segments/count", json={"segment": {}}, headers=stack.staff(EDITOR_KEY))
        return r.status_code == 200
    await stack.until(projected)
    return addr


async def reach(stack: Stack, segment: dict) -> int:
    """How many active subscribers `segment` reaches now. Besides a test's own people, that includes earlier
    tests' subscribers who chose no region (they are in every regional segment), so counts are compared to
    this, and each of a test's own people is checked to have got the campaign once."""
    r = await stack.mailer.post("/api/v1/segments/count", json={"segment": segment}, headers=stack.staff(EDITOR_KEY))
    assert r.status_code == 200, r.text
    return r.json()["count"]


CAMPAIGN = {
    "subject": {"de": "Neuigkeiten für {{ name | default('Sie') }}", "ar": "أخبار {{ name }}"},
    "body_markdown": {"de": "Hallo {{ name }},\n\n**Neu:** das Forum. [Abmelden]({{ unsubscribe_url }})\n\n<b>roh</b>",
                      "ar": "مرحبا {{ name }}\n\n**جديد**"},
}


async def create(stack: Stack, segment: dict, **over) -> dict:
    r = await stack.mailer.post("/api/v1/campaigns", json={**CAMPAIGN, "segment": segment, **over},
                                headers=stack.staff(EDITOR_KEY))
    assert r.status_code == 201, r.text
    return r.json()


async def finished(stack: Stack, campaign_id: str, timeout: float = 60) -> dict:
    async def done():
        r = await stack.mailer.get(f"/api/v1/campaigns/{campaign_id}", headers=stack.staff(EDITOR_KEY))
        return r.json() if r.json()["status"] in ("done", "cancelled") else None
    return await stack.until(done, timeout=timeout, what="the campaign to finish")


async def test_campaign_reaches_its_segment_once_in_each_language(stack: Stack) -> None:
    region = "dessau-rosslau"
    ar = await subscriber(stack, "camp-ar", language="ar", regions=[region], name="<b>Amal</b>")
    en = await subscriber(stack, "camp-en", language="en", regions=[region])  # no English text: German
    other = await subscriber(stack, "camp-other", language="de", regions=["harz"])
    segment = {"regions": [region], "languages": ["ar", "en"]}
    reached = await reach(stack, segment)
    assert reached >= 2
    campaign = await create(stack, segment)
    preview = (await stack.mailer.get(f"/api/v1/campaigns/{campaign['id']}/preview?language=en",
                                      headers=stack.staff(EDITOR_KEY))).json()
    assert preview["falls_back"] and "en" in preview["fallback_languages"] and "ar" not in preview["fallback_languages"]
    assert "&lt;b&gt;roh&lt;/b&gt;" in preview["html"] and "<b>roh</b>" not in preview["html"]
    sent = await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
    assert sent.status_code == 200, sent.text
    result = await finished(stack, campaign["id"])
    assert result["counts"]["sent"] == result["counts"]["total"] == reached

    mail_ar = (await stack.smtp.wait_for(ar, 3))[2]
    assert mail_ar["Content-Language"] == "ar" and 'dir="rtl"' in html_part(mail_ar)
    assert mail_ar["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "<b>Amal</b>" not in html_part(mail_ar) and "&lt;b&gt;Amal&lt;/b&gt;" in html_part(mail_ar)
    mail_en = (await stack.smtp.wait_for(en, 3))[2]
    assert mail_en["Content-Language"] == "de" and mail_en["Subject"] == "Neuigkeiten für Test"
    assert "/unsubscribe?token=" in text_part(mail_en)
    assert stack.mail_settings.organisation_address in text_part(mail_en)
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(other)) == 2 and len(stack.smtp.to(ar)) == 3  # outside the segment; once each


async def test_one_click_unsubscribe_from_a_campaign_skips_the_next_one(stack: Stack) -> None:
    region = "wittenberg"
    leaver = await subscriber(stack, "leaver", regions=[region])
    stayer = await subscriber(stack, "stayer", regions=[region])
    reached = await reach(stack, {"regions": [region]})
    first = await create(stack, {"regions": [region]})
    await stack.mailer.post(f"/api/v1/campaigns/{first['id']}/send", headers=stack.staff(PUBLISHER_KEY))
    await finished(stack, first["id"])
    mail = (await stack.smtp.wait_for(leaver, 3))[2]
    r = await stack.subscriptions.post(f"/unsubscribe?token={manage_token(mail)}", content="List-Unsubscribe=One-Click",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200

    async def unsubscribed_in_mailer():
        return await reach(stack, {"regions": [region]}) == reached - 1
    await stack.until(unsubscribed_in_mailer, what="the mailer to learn of the unsubscription")
    second = await create(stack, {"regions": [region]})
    await stack.mailer.post(f"/api/v1/campaigns/{second['id']}/send", headers=stack.staff(PUBLISHER_KEY))
    result = await finished(stack, second["id"])
    assert result["counts"]["sent"] == reached - 1
    await stack.smtp.wait_for(stayer, 4)
    assert len(stack.smtp.to(leaver)) == 3


async def test_unsafe_staff_text_is_refused_at_save_time(stack: Stack) -> None:
    bad = [
        {"body_markdown": {"de": "{{ name.__class__.__mro__ }}"}},
        {"body_markdown": {"de": "{% for x in range(10) %}x{% endfor %}"}},
        {"body_markdown": {"de": "{{ config }}"}},
        {"subject": {"de": "Hallo\r\nBcc: evil@example.org"}},
        {"subject": {"en": "only English"}},
        {"segment": {"regions": ["atlantis"]}},
    ]
    for override in bad:
        r = await stack.mailer.post("/api/v1/campaigns", json={**CAMPAIGN, **override}, headers=stack.staff(EDITOR_KEY))
        assert r.status_code == 422, (override, r.text)
    assert (await stack.mailer.post("/api/v1/campaigns", json=CAMPAIGN)).status_code == 401
    campaign = await create(stack, {})
    assert (await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send",
                                    headers=stack.staff(EDITOR_KEY))).status_code == 403


async def test_test_send_pause_resume_and_cancel(stack: Stack) -> None:
    region = "jerichower-land"
    people = [await subscriber(stack, f"pause-{i}", regions=[region]) for i in range(12)]
    reached = await reach(stack, {"regions": [region]})
    campaign = await create(stack, {"regions": [region]})
    me = stack.address("staff-test")
    t = await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/test", json={"email": me, "language": "ar"},
                                headers=stack.staff(EDITOR_KEY))
    assert t.status_code == 202
    (test_mail,) = await stack.smtp.wait_for(me)
    assert test_mail["Content-Language"] == "ar"

    stack.smtp.delay = 0.3
    try:
        await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
        await stack.until(lambda: _sent_at_least(stack, campaign["id"], 1), what="sending to start")
        paused = await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/pause",
                                         headers=stack.staff(PUBLISHER_KEY))
        assert paused.json()["status"] == "paused"
        await asyncio.sleep(1.5)  # what was in flight finishes; nothing new starts
        frozen = await _counts(stack, campaign["id"])
        await asyncio.sleep(1.0)
        assert await _counts(stack, campaign["id"]) == frozen
        assert frozen["pending"] > 0 and frozen["sending"] == 0
        resumed = await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/resume",
                                          headers=stack.staff(PUBLISHER_KEY))
        assert resumed.json()["status"] == "sending"
        result = await finished(stack, campaign["id"])
    finally:
        stack.smtp.delay = 0.0
    assert result["counts"]["sent"] == reached >= len(people)
    assert all(len(stack.smtp.to(p)) == 3 for p in people)  # confirmation, welcome, the campaign once

    later = await create(stack, {"regions": [region]})
    cancelled = await stack.mailer.post(f"/api/v1/campaigns/{later['id']}/cancel", headers=stack.staff(PUBLISHER_KEY))
    assert cancelled.json()["status"] == "cancelled"
    assert (await stack.mailer.post(f"/api/v1/campaigns/{later['id']}/send",
                                    headers=stack.staff(PUBLISHER_KEY))).status_code == 409


async def _counts(stack: Stack, campaign_id: str) -> dict:
    r = await stack.mailer.get(f"/api/v1/campaigns/{campaign_id}", headers=stack.staff(EDITOR_KEY))
    return r.json()["counts"]


async def _sent_at_least(stack: Stack, campaign_id: str, n: int) -> bool:
    return (await _counts(stack, campaign_id))["sent"] >= n


async def test_two_mailer_instances_share_a_campaign_without_duplicates(stack: Stack) -> None:
    from services.mailer.app import create_app as create_mailer

    region = "burgenlandkreis"
    people = [await subscriber(stack, f"share-{i}", regions=[region]) for i in range(20)]
    reached = await reach(stack, {"regions": [region]})
    second = create_mailer(stack.mail_settings)
    async with second.router.lifespan_context(second):
        await asyncio.wait_for(second.state.runtime.connected.wait(), 60)
        await asyncio.sleep(6)  # the jobs group rebalances over both instances
        stack.smtp.delay = 0.05
        try:
            campaign = await create(stack, {"regions": [region]})
            async with httpx.AsyncClient(transport=httpx.ASGITransport(second), base_url="http://m2") as other:
                r = await other.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
                assert r.status_code == 200
            result = await finished(stack, campaign["id"])
        finally:
            stack.smtp.delay = 0.0
    assert result["counts"]["sent"] == reached >= len(people)
    assert all(len(stack.smtp.to(p)) == 3 for p in people)


async def test_publishing_an_event_with_announce_sends_an_announcement_once(stack: Stack) -> None:
    from icalendar import Calendar

    region = "mansfeld-suedharz"
    ar = await subscriber(stack, "announce-ar", language="ar", regions=[region])
    outsider = await subscriber(stack, "announce-out", regions=["magdeburg"])
    event = (await stack.events.post("/api/v1/events", headers=stack.staff(EDITOR_KEY), json={
        "kind": "workshop", "title": {"de": "Workshop {{ name }} Willkommen", "ar": "ورشة عمل"},
        "starts_at": "2030-05-04T10:00", "ends_at": "2030-05-04T12:00", "region": region,
        "location": {"name": "Rathaus", "address": "Sangerhausen"}, "announce": True,
        "segment": {"regions": [region]}})).json()
    await stack.events.post(f"/api/v1/events/{event['event_id']}/publish", headers=stack.staff(PUBLISHER_KEY))
    mail = (await stack.smtp.wait_for(ar, 3, timeout=60))[2]
    assert mail["Subject"] == "دعوة: ورشة عمل" and mail["Content-Language"] == "ar"
    assert 'dir="rtl"' in html_part(mail) and f"/events/{event['event_id']}?lang=ar" in text_part(mail)
    (part,) = [p for p in mail.walk() if p.get_content_type() == "text/calendar"]
    cal = Calendar.from_ical(part.get_payload(decode=True))
    assert str(cal["METHOD"]) == "PUBLISH" and str(cal.walk("VEVENT")[0]["UID"]).startswith(event["event_id"])
    campaigns = (await stack.mailer.get("/api/v1/campaigns", headers=stack.staff(EDITOR_KEY))).json()
    (announcement,) = [c for c in campaigns if c["kind"] == "announcement" and "ورشة عمل" in c["subject"]["ar"]]
    result = await finished(stack, announcement["id"])
    assert result["counts"]["sent"] >= 1
    # staff text that looks like a placeholder is shown as written, not evaluated
    preview = (await stack.mailer.get(f"/api/v1/campaigns/{announcement['id']}/preview?language=de",
                                      headers=stack.staff(EDITOR_KEY))).json()
    assert "Workshop {{ name }} Willkommen" in preview["text"]
    assert "Workshop {{ name }} Willkommen" in unescape(preview["html"])
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(outsider)) == 2


async def test_campaign_retries_4xx_and_bounces_5xx_into_suppression(stack: Stack) -> None:
    region = "altmarkkreis-salzwedel"
    flaky = await subscriber(stack, "flaky", regions=[region])
    gone = await subscriber(stack, "gone", regions=[region])
    reached = await reach(stack, {"regions": [region]})
    stack.smtp.script[flaky] = ["451 4.7.1 try again later"]
    stack.smtp.permanent[gone] = "550 5.1.1 no such mailbox"
    try:
        campaign = await create(stack, {"regions": [region]})
        await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
        result = await finished(stack, campaign["id"])
    finally:
        stack.smtp.permanent.pop(gone, None)
    assert result["counts"]["sent"] == reached - 1 and result["counts"]["failed"] == 1
    assert len(stack.smtp.to(flaky)) == 3 and stack.smtp.attempts[flaky] >= 4  # 3 mails, one refused once

    async def suppressed():
        return (await stack.subscriber(gone))["status"] == "suppressed"
    await stack.until(suppressed, what="the bounce to suppress the address")


async def test_digest_lists_upcoming_events_per_person_and_skips_the_empty(stack: Stack) -> None:
    from datetime import UTC, datetime, timedelta

    def soon(days: int, hours: int = 0) -> str:
        return (datetime.now(UTC) + timedelta(days=days, hours=hours)).replace(microsecond=0).isoformat()

    titles = {}
    for region, topic in (("stendal", "arbeitsmarkt"), ("magdeburg", "bildung")):
        created = (await stack.events.post("/api/v1/events", headers=stack.staff(EDITOR_KEY), json={
            "kind": "forum", "title": {"de": f"Digest {region}"}, "starts_at": soon(10), "ends_at": soon(10, 2),
            "region": region, "topics": [topic], "online_url": "https://meet.example.org/x"})).json()
        await stack.events.post(f"/api/v1/events/{created['event_id']}/publish", headers=stack.staff(PUBLISHER_KEY))
        titles[region] = f"Digest {region}"
    stendal = await subscriber(stack, "digest-stendal", regions=["stendal"])
    picky = await subscriber(stack, "digest-picky", regions=["magdeburg"], topics=["veranstaltungen", "arbeitsmarkt"])
    no_events = await subscriber(stack, "digest-funding", topics=["foerderung"])
    everything = await subscriber(stack, "digest-all")

    async def projected():
        async with stack.mail_app.state.db.sessions() as s:
            return len(await stack.mail_app.state.campaigns.upcoming_events(s)) >= 2
    await stack.until(projected, what="the events in the mailer's projection")
    r = await stack.mailer.post("/api/v1/digests", headers=stack.staff(PUBLISHER_KEY))
    assert r.status_code == 201, r.text
    await finished(stack, r.json()["id"])
    mail = (await stack.smtp.wait_for(stendal, 3))[2]
    assert mail["Subject"] == "Veranstaltungen in Ihrer Nähe"
    assert titles["stendal"] in text_part(mail) and titles["magdeburg"] not in text_part(mail)
    both = text_part((await stack.smtp.wait_for(everything, 3))[2])
    assert titles["stendal"] in both and titles["magdeburg"] in both
    await asyncio.sleep(0.5)
    assert len(stack.smtp.to(picky)) == 2 and len(stack.smtp.to(no_events)) == 2  # nobody gets an empty digest
    campaigns = stack.mail_app.state.campaigns
    first = await campaigns.start_digest("2000-01")
    assert first is not None and await campaigns.start_digest("2000-01") is None  # once per period


def test_digest_is_due_on_the_first_chosen_weekday_of_the_month() -> None:
    from services.mailer.digest import due_time

    assert due_time(2026, 12, 0, 9).isoformat() == "2026-12-07T09:00:00+01:00"  # first Monday, Berlin winter time
    assert due_time(2026, 6, 0, 9).isoformat() == "2026-06-01T09:00:00+02:00"
    assert due_time(2027, 2, 4, 18).day == 5  # first Friday


async def test_a_scheduled_campaign_starts_by_itself(stack: Stack) -> None:
    from datetime import UTC, datetime, timedelta

    region = "anhalt-bitterfeld"
    person = await subscriber(stack, "scheduled", regions=[region])
    at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    campaign = await create(stack, {"regions": [region]}, scheduled_at=at)
    r = await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
    assert r.json()["status"] == "scheduled" and stack.smtp.to(person)[-1]["Subject"] != "Neuigkeiten für Test"
    expected = await reach(stack, {"regions": [region]})
    result = await finished(stack, campaign["id"], timeout=60)
    assert result["counts"]["sent"] == expected  # also those who chose no region: they want all regions
    assert (await stack.smtp.wait_for(person, 3))[2]["Subject"] == "Neuigkeiten für Test"


async def test_global_and_per_domain_send_rates_space_the_mails(stack: Stack) -> None:
    """MAILER_SEND_RATE_PER_DOMAIN (and the global rate) hold: six mails to one domain at 5/s take at
    least a second from the first to the last; the limiters are the engine's own, set for this test."""
    from collections import defaultdict

    from services.mailer.sending import RateLimiter

    region = "stendal"
    people = [await subscriber(stack, f"rate-{i}", regions=[region]) for i in range(6)]
    campaigns = stack.mail_app.state.campaigns
    saved = campaigns._domain_limits, campaigns.limiter
    campaigns._domain_limits = defaultdict(lambda: RateLimiter(5.0))
    campaigns.limiter = RateLimiter(50.0)
    try:
        campaign = await create(stack, {"regions": [region]})
        before = len(stack.smtp.messages)
        await stack.mailer.post(f"/api/v1/campaigns/{campaign['id']}/send", headers=stack.staff(PUBLISHER_KEY))
        result = await finished(stack, campaign["id"])
    finally:
        campaigns._domain_limits, campaigns.limiter = saved
    assert result["counts"]["sent"] >= len(people)  # (earlier tests may have left people in that region)
    received = [(rcpts[0], m["Subject"], t) for (rcpts, m), t in
                zip(stack.smtp.messages[before:], stack.smtp.accepted_at[before:], strict=True) if rcpts[0] in people]
    times = [t for _, subject, t in received if subject.startswith("Neuigkeiten")]
    assert len(times) == len(people), received
    assert max(times) - min(times) >= (len(people) - 1) / 5.0 * 0.9  # 5 per second to that domain
