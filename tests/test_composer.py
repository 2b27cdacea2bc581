"""The campaign fast path (services/mailer/composer.py) writes the same mail as the full renderer.

Each campaign is rendered once per language with markers and composed per recipient; these tests put the
composed mail beside `MailRenderer.render` for the same recipient and compare what a mail client shows:
headers, the text part, the HTML part's text and links, attachments. Pure: no broker, no SMTP server.
"""

from __future__ import annotations

import html
import re
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage

import pytest

from services.mailer.composer import Skeleton, TransactionalLetters
from services.mailer.eventmail import literal
from services.mailer.render import HeaderInjection, MailRenderer, Recipient
from services.mailer.smtp import wire_format
from services.mailer.staff_text import render_html, render_text
from shared.i18n import load_translations
from shared.taxonomy import load_taxonomy

BASE = "https://news.example.org"
TOKEN = "3f2a9c1e-0d4b-4e59-9a77-1b2c3d4e5f60.abcDEF_ghi-JKL012mno345"
LANGUAGES = load_taxonomy().languages

SUBJECTS = {
    "plain": "Neuigkeiten im Mai",
    "personal": "{{ name|default('Hallo') }}, Neuigkeiten für {{ email }}",
    "long non-ascii": "Veranstaltungen, Förderprogramme und Weiterbildungen für Migrantenorganisationen in "
                      "Sachsen-Anhalt — Ausgabe Mai " + "ü" * 40,
}
BODIES = {
    "placeholders": "# Hallo {{ name }}!\n\nLiebe(r) {{ name|upper }}, **danke**.\n\n"
                    "[Abmelden]({{ unsubscribe_url }}) · [Einstellungen]({{ preferences_url }})\n\n"
                    "{{ organisation }} — {{ email }}\n\n- eins\n- zwei\n",
    "raw html is text": "<script>alert(1)</script> & <b>fett</b>\n\n1. {{ name }}",
    "literal staff text": "## " + literal("Workshop {{ nicht ersetzen }} & <i>mehr</i>") + "\n\nText {{ name }}",
    "whitespace control": "Hallo {{- name -}} !\n{# ein Kommentar #}Ende",
    "no placeholders": "Nur Text.\n\nZweiter Absatz mit Umlauten: äöüß, عربي, українська.",
    "filters": "{{ name|title }} · {{ name|lower }} · {{ email|upper }} · {{ 'fest'|upper }} · {{ 42 }} · "
               "{{ name|default('x')|title }} · {{ name|default('leer', false) }} · {{ organisation|lower }}",
}
NAMES = [None, "Amira", "<b>Mallory</b> & \"Co\" 'x'", "Jörg Müller-Lüdenscheidt", "مريم", "{{ name }}"]


@pytest.fixture(scope="module")
def renderer() -> MailRenderer:
    return MailRenderer(load_translations(), BASE, "Netzwerk Ä <newsletter@example.org>", "kontakt@example.org",
                        "Netzwerk Migrantenorganisationen", "Hauptstraße 5, 39104 Magdeburg")


def full(renderer: MailRenderer, lang: str, subject: str, body: str, email: str, name: str | None,
         attachments=()) -> EmailMessage:
    """What `Campaigns.render_for` builds for one recipient (the slow path, the reference)."""
    links = renderer.manage_links(TOKEN, lang)
    values = {"name": name or "", "email": email, "organisation": renderer.organisation, **links}
    rendered = renderer.render("campaign", Recipient(email, name, lang), "", {
        "body_html": render_html(body, values), "body_text": render_text(body, values)},
        manage_token=TOKEN, subject=render_text(subject, values), attachments=list(attachments))
    return message_from_bytes(wire_format(rendered.message.as_string().encode()), policy=email_policy.default)


def composed(renderer: MailRenderer, lang: str, subject: str, body: str, email: str, name: str | None,
             attachments=()) -> EmailMessage:
    data, message_id = Skeleton(renderer, lang, subject, body, list(attachments)).compose(email, name, TOKEN)
    assert data == wire_format(data), "composed mails are already in wire format (CRLF, no bare dots)"
    msg = message_from_bytes(data, policy=email_policy.default)
    assert msg["Message-ID"] == message_id
    return msg


def shown(html_part: str) -> tuple[str, list[str]]:
    """The HTML's visible text (whitespace-normalised) and its links, as a mail client would see them."""
    links = [html.unescape(h) for h in re.findall(r'href="([^"]*)"', html_part)]
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<style.*?</style>", "", html_part)))
    return " ".join(text.split()), links


def bodies(msg: EmailMessage) -> dict[str, str]:
    return {part.get_content_type(): part.get_content() for part in msg.walk() if not part.is_multipart()}


def same_mail(a: EmailMessage, b: EmailMessage) -> None:
    for header in ("From", "Reply-To", "To", "Subject", "List-Unsubscribe", "List-Unsubscribe-Post",
                   "Content-Language", "MIME-Version"):
        assert str(a[header]) == str(b[header]), header
    assert a.get_content_type() == b.get_content_type()
    pa, pb = bodies(a), bodies(b)
    assert set(pa) == set(pb)
    assert pa["text/plain"].replace("\r\n", "\n").strip() == pb["text/plain"].replace("\r\n", "\n").strip()
    assert shown(pa["text/html"]) == shown(pb["text/html"])
    for kind in set(pa) - {"text/plain", "text/html"}:
        assert pa[kind] == pb[kind]


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("body", BODIES)
def test_composed_mail_equals_rendered_mail(renderer: MailRenderer, lang: str, body: str) -> None:
    for subject in SUBJECTS.values():
        for name in NAMES:
            email = "amira.o'neil+news@example.org"
            same_mail(composed(renderer, lang, subject, BODIES[body], email, name),
                      full(renderer, lang, subject, BODIES[body], email, name))


def test_attachments_and_rtl(renderer: MailRenderer) -> None:
    ics = ("BEGIN:VCALENDAR\r\nMETHOD:PUBLISH\r\nSUMMARY:Fest ü\r\nEND:VCALENDAR\r\n").encode()
    attachments = [("event.ics", "text/calendar; method=PUBLISH", ics)]
    a = composed(renderer, "ar", SUBJECTS["plain"], BODIES["placeholders"], "a@example.org", "مريم", attachments)
    same_mail(a, full(renderer, "ar", SUBJECTS["plain"], BODIES["placeholders"], "a@example.org", "مريم",
                      attachments))
    assert a.get_content_type() == "multipart/mixed"
    calendar = next(p for p in a.walk() if p.get_content_type() == "text/calendar")
    assert calendar.get_filename() == "event.ics" and calendar.get_param("method") == "PUBLISH"
    assert 'dir="rtl"' in bodies(a)["text/html"]


def test_each_recipient_gets_their_own_links_escaped(renderer: MailRenderer) -> None:
    skeleton = Skeleton(renderer, "de", SUBJECTS["personal"], BODIES["placeholders"])
    first, id1 = skeleton.compose("a@example.org", "<i>A</i>", "token-a&x")
    second, id2 = skeleton.compose("b@example.org", "B", "token-b")
    assert id1 != id2
    a, b = (message_from_bytes(m, policy=email_policy.default) for m in (first, second))
    assert "token-a%26x" in a["List-Unsubscribe"] and "token-b" in b["List-Unsubscribe"]
    html_a = bodies(a)["text/html"]
    assert "&lt;i&gt;A&lt;/i&gt;" in html_a and "<i>A</i>" not in html_a
    assert "token-b" not in first.decode() and "token-a" not in second.decode()


def test_header_injection_in_a_name_is_refused(renderer: MailRenderer) -> None:
    skeleton = Skeleton(renderer, "de", SUBJECTS["personal"], BODIES["placeholders"])
    with pytest.raises(HeaderInjection):
        skeleton.compose("a@example.org", "Eve\r\nBcc: victim@example.org", TOKEN)


# --- confirmation and welcome mails (TransactionalLetters) -------------------------------------------------

CONFIRM_URL = f"{BASE}/confirm?token=abc%26def&lang=de"
TRANSACTIONAL = {
    "confirmation": ("mail.confirmation.subject", {"hours": 48}, {"confirm_url": CONFIRM_URL}),
    "welcome": ("mail.welcome.subject", {}, {"topics_text": "Arbeit & <Bildung>", "regions_text": "Magdeburg"}),
}


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("kind", TRANSACTIONAL)
def test_form_letter_equals_rendered_mail(renderer: MailRenderer, lang: str, kind: str) -> None:
    subject_key, shared, own = TRANSACTIONAL[kind]
    letters = TransactionalLetters(renderer)
    for name in NAMES:
        recipient = Recipient("amira.o'neil+news@example.org", name, lang)
        for _ in range(2):  # the second from the letter written for the first
            data, message_id = letters.compose(kind, recipient, subject_key, shared, own, TOKEN)
            assert data == wire_format(data) and data.isascii()
            a = message_from_bytes(data, policy=email_policy.default)
            assert a["Message-ID"] == message_id
            rendered = renderer.render(kind, recipient, subject_key, {**shared, **own}, manage_token=TOKEN)
            same_mail(a, message_from_bytes(wire_format(rendered.message.as_string().encode()),
                                            policy=email_policy.default))
    assert len(letters._letters) == 2  # with and without a name


def test_form_letters_keep_recipients_apart_and_escape_their_values(renderer: MailRenderer) -> None:
    letters = TransactionalLetters(renderer)
    subject_key, shared, _own = TRANSACTIONAL["welcome"]
    first, _ = letters.compose("welcome", Recipient("a@example.org", "<i>A</i>", "de"), subject_key, shared,
                               {"topics_text": "<script>x</script>", "regions_text": "Halle"}, "token-a")
    second, _ = letters.compose("welcome", Recipient("b@example.org", "B", "de"), subject_key, shared,
                                {"topics_text": "Arbeit", "regions_text": "Magdeburg"}, "token-b")
    a, b = (bodies(message_from_bytes(m, policy=email_policy.default)) for m in (first, second))
    assert "&lt;script&gt;x&lt;/script&gt;" in a["text/html"] and "<script>" not in a["text/html"]
    assert "&lt;i&gt;A&lt;/i&gt;" in a["text/html"] and "Halle" in a["text/plain"]
    assert "token-a" not in second.decode() and "Halle" not in b["text/plain"] and "Magdeburg" in b["text/plain"]
    # A non-ASCII address is written by the full renderer (SMTPUTF8), not from a letter.
    assert letters.compose("welcome", Recipient("jörg@example.org", "J", "de"), subject_key, shared,
                           {"topics_text": "A", "regions_text": "B"}, "t") is None
    with pytest.raises(HeaderInjection):
        letters.compose("welcome", Recipient("e@example.org", "Eve\r\nBcc: v@example.org", "de"), subject_key,
                        shared, {"topics_text": "A", "regions_text": "B"}, "t")


def test_every_composed_mail_has_its_own_message_id_at_the_senders_domain(renderer: MailRenderer) -> None:
    skeleton = Skeleton(renderer, "de", SUBJECTS["plain"], BODIES["no placeholders"])
    ids = [skeleton.compose(f"r{i}@example.org", None, TOKEN)[1] for i in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"<[0-9a-f]{32}\.\d+@example\.org>", i) for i in ids), ids[:3]
    # One random part per process, then counted: the OS is not asked for randomness per mail.
    assert len({i.split(".")[0] for i in ids}) == 1


@pytest.mark.parametrize("name", [None, ""])
def test_a_recipient_without_a_name_gets_the_staffs_default(renderer: MailRenderer, name: str | None) -> None:
    body = "Hallo {{ name | default('zusammen') }}!\n\n{{ name|default('<b>ihr</b>')|upper }}"
    for mail in (composed(renderer, "de", SUBJECTS["personal"], body, "ohne@example.org", name),
                 full(renderer, "de", SUBJECTS["personal"], body, "ohne@example.org", name)):
        assert mail["Subject"] == "Hallo, Neuigkeiten für ohne@example.org"
        text = mail.get_body(("plain",)).get_content()
        assert "Hallo zusammen!" in text and "<B>IHR</B>" in text, text
        assert "&lt;B&gt;IHR&lt;/B&gt;" in mail.get_body(("html",)).get_content()
    named = composed(renderer, "de", SUBJECTS["personal"], body, "amira@example.org", "Amira")
    assert "Hallo Amira!" in named.get_body(("plain",)).get_content()
