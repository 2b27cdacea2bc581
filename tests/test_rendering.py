"""Mail rendering (SPEC §2.5) in every language: MIME structure, headers, direction, inlined CSS, links,
escaping and header-injection safety. Pure: no broker, no SMTP server."""

from __future__ import annotations

import html
import re
import string
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import parseaddr, parsedate_to_datetime

import pytest

from services.mailer.render import HeaderInjection, MailRenderer, Recipient, safe_header
from shared.i18n import Translations, load_translations
from shared.taxonomy import load_taxonomy

BASE = "https://news.example.org"
MAIL_FROM = "Netzwerk <newsletter@example.org>"
REPLY_TO = "kontakt@example.org"
ORGANISATION = "Netzwerk Migrantenorganisationen"
ADDRESS = "Hauptstraße 5, 39104 Magdeburg"
TOKEN = "3f2a9c1e-0d4b-4e59-9a77-1b2c3d4e5f60.abcDEF_ghi-JKL012mno345"
CONFIRM_URL = f"{BASE}/confirm?token=confirm-token-123"
LANGUAGES = load_taxonomy().languages
RTL = {"ar", "fa"}


@pytest.fixture(scope="module")
def tr() -> Translations:
    return load_translations()


@pytest.fixture(scope="module")
def renderer(tr: Translations) -> MailRenderer:
    return MailRenderer(tr, BASE, MAIL_FROM, REPLY_TO, ORGANISATION, ADDRESS)


def confirmation(renderer: MailRenderer, lang: str, name: str | None = "Amira") -> EmailMessage:
    recipient = Recipient(email="amira@example.org", name=name, language=lang)
    return renderer.render("confirmation", recipient, "mail.confirmation.subject",
                           {"confirm_url": CONFIRM_URL, "hours": 72}, manage_token=TOKEN).message


def welcome(renderer: MailRenderer, lang: str, name: str | None = "Amira") -> EmailMessage:
    recipient = Recipient(email="amira@example.org", name=name, language=lang)
    return renderer.render("welcome", recipient, "mail.welcome.subject",
                           {"topics_text": "Bildung", "regions_text": "Halle (Saale)"}, manage_token=TOKEN).message


def parts(msg: EmailMessage) -> tuple[str, str]:
    """(text, html) of a multipart/alternative message, decoded."""
    assert msg.get_content_type() == "multipart/alternative"
    by_type = {p.get_content_type(): p for p in msg.iter_parts()}
    assert set(by_type) == {"text/plain", "text/html"}
    return by_type["text/plain"].get_content(), by_type["text/html"].get_content()


def reparsed(msg: EmailMessage) -> EmailMessage:
    """The message as a receiving MTA sees it (wire bytes parsed again)."""
    return message_from_bytes(msg.as_bytes(), policy=email_policy.default)


def links(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>]+", text, flags=re.IGNORECASE)


# --- catalogs and taxonomy -----------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_catalog_has_every_key(tr: Translations, lang: str) -> None:
    assert tr.missing(lang) == []
    assert all(text.strip() for text in tr.catalogs[lang].values()), "an empty text falls back silently"


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_catalog_uses_the_same_placeholders_as_german(tr: Translations, lang: str) -> None:
    def fields(text: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}

    german = tr.catalogs[tr.taxonomy.default_language]
    wrong = {key: (fields(text), fields(german[key])) for key, text in tr.catalogs[lang].items()
             if key in german and fields(text) != fields(german[key])}
    assert wrong == {}


def test_taxonomy_has_every_label() -> None:
    assert load_taxonomy().missing_labels() == []


# --- confirmation mail --------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_confirmation_mail(renderer: MailRenderer, tr: Translations, lang: str) -> None:
    msg = confirmation(renderer, lang)
    text, body = parts(msg)

    assert msg["Subject"] == tr.gettext(lang, "mail.confirmation.subject", organisation=ORGANISATION)
    assert reparsed(msg)["Subject"] == msg["Subject"]  # survives encoding on the wire
    assert msg["Content-Language"] == lang
    direction = "rtl" if lang in RTL else "ltr"
    assert f'dir="{direction}"' in body
    assert f'dir="{"ltr" if lang in RTL else "rtl"}"' not in body
    assert f'lang="{lang}"' in body
    # texts of the recipient's catalog, not the German fallback
    assert tr.catalogs[lang]["mail.confirmation.button"] in html.unescape(body)
    for key in ("mail.confirmation.text", "mail.confirmation.ignore"):
        assert tr.catalogs[lang][key] in html.unescape(body), key
        assert tr.catalogs[lang][key] in text, key
    assert tr.gettext(lang, "mail.confirmation.expiry", hours=72) in text
    assert tr.gettext(lang, "mail.greeting", name="Amira") in text
    assert CONFIRM_URL in text
    assert f'href="{html.escape(CONFIRM_URL)}"' in body
    # with a manage token, someone signed up by a stranger can refuse further mail with one click
    assert msg["List-Unsubscribe"].startswith(f"<{BASE}/unsubscribe?token={TOKEN}")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_confirmation_without_manage_token_has_no_unsubscribe_header(renderer: MailRenderer) -> None:
    recipient = Recipient(email="amira@example.org", name=None, language="de")
    msg = renderer.render("confirmation", recipient, "mail.confirmation.subject",
                          {"confirm_url": CONFIRM_URL, "hours": 72}).message
    assert msg["List-Unsubscribe"] is None and msg["List-Unsubscribe-Post"] is None


@pytest.mark.parametrize("kind", ["confirmation", "welcome"])
@pytest.mark.parametrize("lang", LANGUAGES)
def test_common_headers_css_and_footer(renderer: MailRenderer, lang: str, kind: str) -> None:
    msg = (confirmation if kind == "confirmation" else welcome)(renderer, lang)
    text, body = parts(msg)

    for header in ("Message-ID", "Date", "From", "Reply-To", "To", "Subject", "MIME-Version"):
        assert msg[header], header
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@example.org>")
    assert parsedate_to_datetime(msg["Date"]).tzinfo is not None
    assert parseaddr(msg["From"]) == ("Netzwerk", "newsletter@example.org")
    assert parseaddr(msg["Reply-To"])[1] == REPLY_TO
    assert parseaddr(msg["To"]) == ("Amira", "amira@example.org")
    assert msg["Content-Language"] == lang
    # CSS inlined: style attributes, no <style> element left for mail clients that strip it
    assert 'style="' in body
    assert "<style" not in body.lower()
    assert body.lstrip().lower().startswith("<!doctype html>")
    # postal address (imprint) in both parts
    assert ADDRESS in text and ADDRESS in html.unescape(body)
    assert ORGANISATION in text
    # every link points to the public site
    for link in links(text) + links(html.unescape(body)):
        assert link.startswith(BASE + "/"), link
    # lines stay within the SMTP limit
    assert all(len(line) <= 998 for line in msg.as_bytes().split(b"\r\n"))


# --- welcome mail -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGUAGES)
def test_welcome_mail(renderer: MailRenderer, tr: Translations, lang: str) -> None:
    msg = welcome(renderer, lang)
    text, body = parts(msg)
    unescaped = html.unescape(body)

    assert msg["Subject"] == tr.gettext(lang, "mail.welcome.subject", organisation=ORGANISATION)
    assert ORGANISATION in msg["Subject"]
    assert reparsed(msg)["Subject"] == msg["Subject"]
    assert f'dir="{"rtl" if lang in RTL else "ltr"}"' in body
    assert f'lang="{lang}"' in body

    # RFC 2369 / RFC 8058 one-click unsubscribe
    unsubscribe = msg["List-Unsubscribe"]
    assert unsubscribe.startswith(f"<{BASE}/unsubscribe?token={TOKEN}")
    assert unsubscribe.endswith(">") and unsubscribe.count("<") == 1
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert reparsed(msg)["List-Unsubscribe"] == unsubscribe

    unsubscribe_url = unsubscribe[1:-1]
    preferences_url = unsubscribe_url.replace("/unsubscribe?", "/preferences?", 1)
    assert f"{tr.catalogs[lang]['mail.unsubscribe']}: {unsubscribe_url}" in text
    assert f"{tr.catalogs[lang]['mail.preferences']}: {preferences_url}" in text
    assert f"lang={lang}" in unsubscribe_url
    assert f'href="{unsubscribe_url}"' in unescaped and f'href="{preferences_url}"' in unescaped

    for key in ("mail.welcome.text", "mail.welcome.material_title", "mail.welcome.material",
                "mail.unsubscribe", "mail.preferences"):
        assert tr.catalogs[lang][key] in unescaped, key
        assert tr.catalogs[lang][key] in text, key
    what_next = tr.gettext(lang, "mail.welcome.what_next", topics="Bildung", regions="Halle (Saale)")
    assert what_next in text and what_next in unescaped
    assert tr.gettext(lang, "mail.why", organisation=ORGANISATION) in text


def test_texts_differ_between_languages(renderer: MailRenderer) -> None:
    """Each language really gets its own text (no silent German fallback)."""
    subjects = {lang: confirmation(renderer, lang)["Subject"] for lang in LANGUAGES}
    assert len(set(subjects.values())) == len(LANGUAGES)


def test_unknown_language_falls_back_to_german(renderer: MailRenderer, tr: Translations) -> None:
    msg = confirmation(renderer, "xx")
    assert msg["Content-Language"] == "de"
    assert msg["Subject"] == tr.gettext("de", "mail.confirmation.subject")


def test_no_name_uses_the_anonymous_greeting(renderer: MailRenderer, tr: Translations) -> None:
    msg = welcome(renderer, "en", name=None)
    text, _body = parts(msg)
    assert text.startswith(tr.gettext("en", "mail.greeting_anonymous"))
    assert parseaddr(msg["To"]) == ("", "amira@example.org")


def test_manage_token_is_url_encoded(renderer: MailRenderer) -> None:
    recipient = Recipient(email="a@example.org", name=None, language="de")
    msg = renderer.render("welcome", recipient, "mail.welcome.subject",
                          {"topics_text": "x", "regions_text": "y"}, manage_token="a b&c=d>e").message
    assert msg["List-Unsubscribe"] == f"<{BASE}/unsubscribe?token=a+b%26c%3Dd%3Ee&lang=de>"


# --- escaping and header injection ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["confirmation", "welcome"])
def test_name_is_escaped_in_html(renderer: MailRenderer, kind: str) -> None:
    name = "Amira <script>alert(1)</script>"
    msg = (confirmation if kind == "confirmation" else welcome)(renderer, "de", name=name)
    text, body = parts(msg)
    assert "<script" not in body.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert name in text  # the text part is plain text: no escaping needed
    assert parseaddr(reparsed(msg)["To"]) == (name, "amira@example.org")


@pytest.mark.parametrize("name", ["Eve\r\nBcc: x@evil", "Eve\nBcc: x@evil", "Eve\rBcc: x@evil"])
def test_name_with_line_break_is_refused(renderer: MailRenderer, name: str) -> None:
    with pytest.raises(HeaderInjection):
        confirmation(renderer, "de", name=name)


def test_header_injection_is_a_value_error() -> None:
    assert issubclass(HeaderInjection, ValueError)
    assert safe_header("Amira Ümit") == "Amira Ümit"
    for bad in ("a\r\nBcc: x@evil", "a\nb", "a\rb"):
        with pytest.raises(HeaderInjection):
            safe_header(bad)


def test_renderer_refuses_line_breaks_in_its_own_headers(tr: Translations) -> None:
    with pytest.raises(HeaderInjection):
        MailRenderer(tr, BASE, "Netzwerk <n@example.org>\r\nBcc: x@evil", REPLY_TO, ORGANISATION, ADDRESS)
    with pytest.raises(HeaderInjection):
        MailRenderer(tr, BASE, MAIL_FROM, "kontakt@example.org\nBcc: x@evil", ORGANISATION, ADDRESS)


def test_organisation_with_line_break_cannot_inject_into_the_subject(tr: Translations) -> None:
    renderer = MailRenderer(tr, BASE, MAIL_FROM, REPLY_TO, "Evil\r\nBcc: x@evil", ADDRESS)
    with pytest.raises(HeaderInjection):
        welcome(renderer, "en")  # the welcome subject contains the organisation


def test_non_ascii_name_survives_the_wire(renderer: MailRenderer) -> None:
    name = "مریم Ахмедова"
    msg = confirmation(renderer, "fa", name=name)
    wire = msg.as_bytes()
    assert name.encode() not in wire.split(b"\r\n\r\n", 1)[0]  # headers are RFC 2047-encoded
    assert b"Bcc" not in wire
    assert parseaddr(reparsed(msg)["To"]) == (name, "amira@example.org")


def test_attachments_make_a_mixed_message(renderer: MailRenderer) -> None:
    recipient = Recipient(email="a@example.org", name=None, language="en")
    msg = renderer.render("welcome", recipient, "mail.welcome.subject",
                          {"topics_text": "x", "regions_text": "y"}, manage_token=TOKEN,
                          attachments=[("flyer.pdf", "application/pdf", b"%PDF-1.4 test")]).message
    assert msg.get_content_type() == "multipart/mixed"
    first, attachment = list(msg.iter_parts())
    assert first.get_content_type() == "multipart/alternative"
    assert attachment.get_filename() == "flyer.pdf"
    assert attachment.get_content() == b"%PDF-1.4 test"
    assert msg["Content-Language"] == "en"
    assert msg["List-Unsubscribe"].startswith(f"<{BASE}/unsubscribe?token=")


def test_attachments_keep_content_language_on_the_message(renderer: MailRenderer) -> None:
    recipient = Recipient(email="a@example.org", name=None, language="en")
    msg = renderer.render("welcome", recipient, "mail.welcome.subject",
                          {"topics_text": "x", "regions_text": "y"}, manage_token=TOKEN,
                          attachments=[("flyer.pdf", "application/pdf", b"%PDF-1.4 test")]).message
    assert msg["Content-Language"] == "en"
