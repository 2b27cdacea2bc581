"""The double opt-in path end to end: HTTP → outbox → Kafka → mailer → SMTP → confirm → welcome → leave."""

from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select, update

from services.subscriptions import store
from shared.db import utcnow
from tests.conftest import Stack, confirm_url, html_part, manage_token, text_part


async def test_form_signup_confirm_welcome_and_one_click_unsubscribe(stack: Stack) -> None:
    addr = stack.address("form")
    page = await stack.subscriptions.get("/subscribe", headers={"Accept-Language": "ar,en;q=0.5"})
    assert page.status_code == 200
    assert 'dir="rtl"' in page.text and 'lang="ar"' in page.text
    assert '<label for="email">' in page.text and 'name="website"' in page.text  # labelled field, honeypot

    r = await stack.subscriptions.post("/subscribe", data={
        "email": addr, "name": "Amira", "language": "ar", "topics": ["arbeitsmarkt", "bildung"],
        "regions": ["halle"], "consent": "true"}, headers={"X-Forwarded-For": stack.ip(), "User-Agent": "FormTest/1"})
    assert r.status_code == 200
    assert 'dir="rtl"' in r.text

    (mail,) = await stack.smtp.wait_for(addr, 1)
    assert mail.get_content_type() == "multipart/alternative"
    assert mail["Content-Language"] == "ar"
    assert 'dir="rtl"' in html_part(mail)
    link = confirm_url(mail)
    assert link.startswith("http://bridgepost.test/confirm?token=")  # PUBLIC_BASE_URL, not the Host header

    # GET shows a button and changes nothing (mail scanners follow links).
    path = link.removeprefix("http://bridgepost.test")
    for _ in range(2):
        page = await stack.subscriptions.get(path)
        assert page.status_code == 200 and "<form method=\"post\"" in page.text and "<button" in page.text
    assert (await stack.subscriber(addr))["status"] == "pending"

    token = re.search(r"token=([^&]+)", link).group(1)
    done = await stack.subscriptions.post("/confirm?lang=ar", data={"token": token},
                                          headers={"X-Forwarded-For": "10.9.9.9"})
    assert done.status_code == 200
    assert (await stack.subscriber(addr))["status"] == "active"

    welcome = (await stack.smtp.wait_for(addr, 2))[1]
    assert welcome["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert welcome["List-Unsubscribe"].startswith("<http://bridgepost.test/unsubscribe?token=")
    assert "/preferences?token=" in text_part(welcome) and "/unsubscribe?token=" in text_part(welcome)
    assert stack.sub_settings.organisation_address in text_part(welcome)

    # RFC 8058 one-click: POST with the body mail providers send, no cookies, no auth.
    one_click = await stack.subscriptions.post(
        f"/unsubscribe?token={manage_token(welcome)}", content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert one_click.status_code == 200
    subscriber = await stack.subscriber(addr)
    assert subscriber["status"] == "unsubscribed"

    export = await stack.subscriptions.get(f"/api/v1/subscribers/{subscriber['id']}/export", headers=stack.staff())
    log = export.json()["consent_log"]
    assert [e["action"] for e in log] == ["requested", "confirmed", "withdrawn"]
    requested, confirmed, withdrawn = log
    assert requested["ip"] and requested["user_agent"] == "FormTest/1" and requested["source"] == "form"
    assert requested["consent_text_version"] == stack.sub_settings.consent_text_version
    assert requested["consent_text"] and requested["language"] == "ar"
    assert confirmed["ip"] == "10.9.9.9" and confirmed["occurred_at"] > requested["occurred_at"]
    assert withdrawn["source"] == "one-click"
    assert len(stack.smtp.to(addr)) == 2  # nothing after leaving


async def test_json_signup_returns_202_and_mails_in_the_chosen_language(stack: Stack) -> None:
    addr = stack.address("json")
    r = await stack.signup(addr, language="uk", topics=["veranstaltungen"], regions=["magdeburg"])
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    (mail,) = await stack.smtp.wait_for(addr)
    assert mail["Content-Language"] == "uk" and 'dir="ltr"' in html_part(mail)
    assert (await stack.confirm(addr)).status_code == 200
    welcome = (await stack.smtp.wait_for(addr, 2))[1]
    assert "Магдебург" in text_part(welcome)  # region label in Ukrainian


async def test_known_and_unknown_addresses_get_the_same_answer(stack: Stack) -> None:
    known = stack.address("known")
    await stack.signup(known)
    await stack.confirm(known)
    unknown = stack.address("unknown")
    a, b = await stack.signup(known), await stack.signup(unknown)
    assert (a.status_code, a.json()) == (b.status_code, b.json())
    fa = await stack.subscriptions.post("/subscribe", data={"email": known, "consent": "true", "language": "en"},
                                        headers={"X-Forwarded-For": stack.ip()})
    fb = await stack.subscriptions.post("/subscribe", data={"email": stack.address(), "consent": "true",
                                                            "language": "en"}, headers={"X-Forwarded-For": stack.ip()})
    assert fa.status_code == fb.status_code and fa.text == fb.text


async def test_resignup_of_an_active_subscriber_changes_choices_only_after_confirmation(stack: Stack) -> None:
    addr = stack.address("active")
    await stack.signup(addr, topics=["teilhabe"])
    await stack.confirm(addr)
    await stack.smtp.wait_for(addr, 2)
    await stack.signup(addr, topics=["foerderung"], language="tr")
    third = (await stack.smtp.wait_for(addr, 3))[2]
    assert "/confirm?" in text_part(third) and third["Content-Language"] == "tr"
    assert (await stack.subscriber(addr))["topics"] == ["teilhabe"]  # unchanged until confirmed
    assert (await stack.confirm(addr, 3)).status_code == 200
    sub = await stack.subscriber(addr)
    assert sub["status"] == "active" and sub["topics"] == ["foerderung"] and sub["language"] == "tr"


async def test_resignup_after_unsubscribing_needs_a_new_confirmation(stack: Stack) -> None:
    addr = stack.address("comeback")
    await stack.signup(addr)
    await stack.confirm(addr)
    welcome = (await stack.smtp.wait_for(addr, 2))[1]
    await stack.subscriptions.post(f"/unsubscribe?token={manage_token(welcome)}", data={"confirm": "yes"})
    assert (await stack.subscriber(addr))["status"] == "unsubscribed"
    await stack.signup(addr)
    await stack.smtp.wait_for(addr, 3)
    assert (await stack.subscriber(addr))["status"] == "pending"
    assert (await stack.confirm(addr, 3)).status_code == 200
    assert (await stack.subscriber(addr))["status"] == "active"


async def test_confirmation_token_is_single_use_and_expires(stack: Stack) -> None:
    addr = stack.address("token")
    await stack.signup(addr, language="fa")
    link = await stack.confirm_link(addr)
    token = re.search(r"token=([^&]+)", link).group(1)
    assert (await stack.subscriptions.post("/confirm", data={"token": token})).status_code == 200
    again = await stack.subscriptions.post("/confirm", data={"token": token})
    assert again.status_code == 404 and 'dir="rtl"' in again.text  # friendly page in the visitor's language
    page = await stack.subscriptions.get(f"/confirm?token={token}")
    assert page.status_code == 404 and "<button" not in page.text

    late = stack.address("late")
    await stack.signup(late)
    token = re.search(r"token=([^&]+)", await stack.confirm_link(late)).group(1)
    db = stack.sub_app.state.db
    async with db.transaction() as s:
        await s.execute(update(store.confirmation_tokens).values(expires_at=utcnow() - timedelta(seconds=1))
                        .where(store.confirmation_tokens.c.subscriber_id == (await stack.subscriber(late))["id"]))
    expired = await stack.subscriptions.post("/confirm", data={"token": token})
    assert expired.status_code == 404
    assert (await stack.subscriber(late))["status"] == "pending"
    for bogus in ("", "nonsense", "x" * 5000, "%00%ff"):
        r = await stack.subscriptions.post("/confirm", data={"token": bogus})
        assert r.status_code == 404, bogus
        assert (await stack.subscriptions.get("/confirm", params={"token": bogus})).status_code == 404


async def test_at_most_three_confirmation_mails_per_address_per_day(stack: Stack) -> None:
    addr = stack.address("limit")
    for _ in range(5):
        assert (await stack.signup(addr)).status_code == 202
    await stack.smtp.wait_for(addr, 3)
    other = stack.address("after-limit")  # a later sign-up is mailed, so the mailer has caught up
    await stack.signup(other)
    await stack.smtp.wait_for(other)
    assert len(stack.smtp.to(addr)) == 3


async def test_per_ip_limit_answers_429(stack: Stack) -> None:
    ip = stack.ip()
    codes = [(await stack.signup(stack.address("ip"), ip=ip)).status_code for _ in range(6)]
    assert codes[:5] == [202] * 5 and codes[5] == 429
    form = await stack.subscriptions.post("/subscribe", data={"email": stack.address(), "consent": "true"},
                                          headers={"X-Forwarded-For": ip})
    assert form.status_code == 429 and "Retry-After" in form.headers


async def test_honeypot_gets_the_same_answer_and_nothing_happens(stack: Stack) -> None:
    addr = stack.address("bot")
    r = await stack.signup(addr, website="http://spam.example")
    assert r.status_code == 202
    canary = stack.address("canary")
    await stack.signup(canary)
    await stack.smtp.wait_for(canary)
    assert stack.smtp.to(addr) == []
    r = await stack.subscriptions.get("/api/v1/subscribers", params={"email": addr}, headers=stack.staff())
    assert r.json()["total"] == 0


async def test_bad_json_input_gets_422_with_field_errors(stack: Stack) -> None:
    cases = {
        "email": {"email": "not-an-address"},
        "consent": {"consent": False},
        "regions": {"regions": ["atlantis"]},
        "topics": {"topics": ["cooking"]},
        "language": {"language": "xx"},
        "name": {"name": "n" * 201},
    }
    for field, override in cases.items():
        body = {"email": stack.address("bad"), "name": "X", "language": "de", "topics": [], "regions": [],
                "consent": True, **override}
        r = await stack.subscriptions.post("/api/v1/subscriptions", json=body)
        assert r.status_code == 422, (field, r.text)
        assert any(err["loc"][-1] == field for err in r.json()["detail"]), (field, r.json())
    missing = await stack.subscriptions.post("/api/v1/subscriptions", json={"email": stack.address()})
    assert missing.status_code == 422 and any(e["loc"][-1] == "consent" for e in missing.json()["detail"])
    garbage = await stack.subscriptions.post("/api/v1/subscriptions", content=b"\xff\xfe{",
                                             headers={"Content-Type": "application/json"})
    assert garbage.status_code in (400, 422)  # not JSON at all: a plain client error
    huge = await stack.subscriptions.post("/api/v1/subscriptions", content=b"x" * (1024 * 1024),
                                          headers={"Content-Type": "application/json"})
    assert huge.status_code == 413


async def test_bad_form_input_shows_the_form_again_with_messages_in_the_visitors_language(stack: Stack) -> None:
    r = await stack.subscriptions.post("/subscribe", data={
        "email": "kaputt", "language": "de", "regions": ["atlantis"], "name": "<script>alert(1)</script>"})
    assert r.status_code == 422
    assert "Bitte geben Sie eine gültige E-Mail-Adresse ein." in r.text
    assert "Bitte bestätigen Sie, dass Sie den Newsletter erhalten möchten." in r.text
    assert "Unbekannte Region: atlantis" in r.text
    assert "<script>alert(1)</script>" not in r.text and "&lt;script&gt;" in r.text  # echoed, escaped
    assert 'value="kaputt"' in r.text  # nothing the visitor typed is lost
    r = await stack.subscriptions.post("/subscribe", data={"email": "", "language": "ar"})
    assert r.status_code == 422 and 'dir="rtl"' in r.text and 'aria-invalid="true"' in r.text


async def test_names_are_escaped_in_mails(stack: Stack) -> None:
    addr = stack.address("xss")
    await stack.signup(addr, name='<img src=x onerror="alert(1)">')
    (mail,) = await stack.smtp.wait_for(addr)
    html = html_part(mail)
    assert "<img src=x" not in html and "&lt;img src=x" in html


async def test_cors_allows_the_configured_website_only(stack: Stack) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = await stack.subscriptions.options("/api/v1/subscriptions",
                                           headers={"Origin": "https://www.example-verein.de", **preflight})
    assert ok.headers.get("access-control-allow-origin") == "https://www.example-verein.de"
    other = await stack.subscriptions.options("/api/v1/subscriptions",
                                              headers={"Origin": "https://evil.example", **preflight})
    assert other.headers.get("access-control-allow-origin") is None


async def test_preferences_page_changes_choices_and_can_withdraw(stack: Stack) -> None:
    addr = stack.address("prefs")
    await stack.signup(addr, topics=["bildung"], regions=["harz"])
    await stack.confirm(addr)
    welcome = (await stack.smtp.wait_for(addr, 2))[1]
    token = manage_token(welcome)
    page = await stack.subscriptions.get(f"/preferences?token={token}")
    assert page.status_code == 200 and 'value="bildung" checked' in page.text
    saved = await stack.subscriptions.post(f"/preferences?token={token}", data={
        "action": "save", "language": "ru", "topics": ["foerderung"], "regions": ["stendal", "harz"]})
    assert saved.status_code == 200 and 'role="status"' in saved.text and 'lang="ru"' in saved.text
    sub = await stack.subscriber(addr)
    assert sub["language"] == "ru" and sub["topics"] == ["foerderung"] and sub["regions"] == ["stendal", "harz"]
    bad = await stack.subscriptions.post(f"/preferences?token={token}", data={"action": "save", "language": "zz"})
    assert bad.status_code == 422
    forged = await stack.subscriptions.get(f"/preferences?token={sub['id']}.AAAAAAAAAAAAAAAAAAAAAAAA")
    assert forged.status_code == 404
    gone = await stack.subscriptions.post(f"/preferences?token={token}", data={"action": "withdraw"})
    assert gone.status_code == 200 and (await stack.subscriber(addr))["status"] == "unsubscribed"
    async with stack.sub_app.state.db.sessions() as s:
        log = store.consent_log
        actions = (await s.scalars(select(log.c.action).where(log.c.subscriber_id == sub["id"])
                                   .order_by(log.c.id))).all()
    assert actions == ["requested", "confirmed", "preferences_changed", "withdrawn"]
