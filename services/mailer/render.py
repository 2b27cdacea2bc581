"""Renders mails (SPEC §2.5): Jinja2 templates in the recipient's language, text + HTML, CSS inlined."""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import css_inline
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from shared.db import utcnow
from shared.i18n import Translations

TEMPLATES = Path(__file__).with_name("templates") / "mail"
POLICY = email.policy.SMTP.clone(max_line_length=998)


class HeaderInjection(ValueError):
    pass


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_header(value: str) -> str:
    if _CONTROL.search(value):
        raise HeaderInjection("control characters (CR/LF and others) in a header value")
    return value


@dataclass(frozen=True)
class Recipient:
    email: str
    name: str | None
    language: str


@dataclass(frozen=True)
class Rendered:
    message: EmailMessage
    message_id: str


class MailRenderer:
    def __init__(self, translations: Translations, public_base_url: str, mail_from: str, reply_to: str,
                 organisation: str, address: str) -> None:
        self.tr = translations
        self.base = public_base_url.rstrip("/")
        self.mail_from, self.reply_to = safe_header(mail_from), safe_header(reply_to)
        self.organisation, self.address = organisation, address
        self.domain = parseaddr(mail_from)[1].rpartition("@")[2] or "bridgepost.local"
        self.html = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]),
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.text = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=False,
                                undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.inliner = css_inline.CSSInliner(keep_style_tags=False)

    def link(self, path: str, **params: str) -> str:
        return f"{self.base}{path}?{urlencode(params)}"

    def manage_links(self, manage_token: str, language: str) -> dict[str, str]:
        return {"unsubscribe_url": self.link("/unsubscribe", token=manage_token, lang=language),
                "preferences_url": self.link("/preferences", token=manage_token, lang=language)}

    def render_parts(self, kind: str, recipient: Recipient, subject_key: str, context: dict[str, Any],
                     links: dict[str, str] | None = None, template: str | None = None,
                     subject_values: dict[str, Any] | None = None, subject: str | None = None,
                     ) -> tuple[str, str, str, str]:
        """(language, subject, text, html) of `kind` (templates `<template or kind>.html` and `.txt`)."""
        lang = recipient.language if recipient.language in self.tr.taxonomy.languages \
            else self.tr.taxonomy.default_language
        taxonomy = self.tr.taxonomy

        def _(key: str, **values: object) -> str:
            return self.tr.gettext(lang, key, **values)

        ctx = dict(_=_, lang=lang, dir=taxonomy.text_direction(lang), name=recipient.name, kind=kind,
                   organisation=self.organisation, address=self.address, taxonomy=taxonomy, **(links or {}),
                   **context)
        subject = safe_header(subject if subject is not None else
                              _(subject_key, organisation=self.organisation, **(subject_values or {})))
        name = template or kind
        text = self.text.get_template(f"{name}.txt").render(ctx)
        html = self.inliner.inline(self.html.get_template(f"{name}.html").render(subject=subject, **ctx))
        return lang, subject, text, html

    def render(self, kind: str, recipient: Recipient, subject_key: str, context: dict[str, Any],
               manage_token: str | None = None, attachments: list[tuple[str, str, bytes]] = (),
               template: str | None = None, subject_values: dict[str, Any] | None = None,
               subject: str | None = None) -> Rendered:
        """Build the MIME message for `kind` (templates `<template or kind>.html` and `.txt`)."""
        lang = recipient.language if recipient.language in self.tr.taxonomy.languages \
            else self.tr.taxonomy.default_language
        links = self.manage_links(manage_token, lang) if manage_token else {}
        lang, subject, text, html = self.render_parts(kind, recipient, subject_key, context, links, template,
                                                      subject_values, subject)

        msg = EmailMessage(policy=POLICY)
        message_id = make_msgid(domain=self.domain)
        msg["Message-ID"] = message_id
        msg["Date"] = format_datetime(utcnow())
        msg["From"] = self.mail_from
        msg["Reply-To"] = self.reply_to
        msg["To"] = Address(display_name=safe_header(recipient.name or ""), addr_spec=recipient.email)
        msg["Subject"] = subject
        if links:
            msg["List-Unsubscribe"] = f"<{links['unsubscribe_url']}>"
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(text, subtype="plain", charset="utf-8")
        msg.add_alternative(html, subtype="html", charset="utf-8")
        if attachments:
            msg.make_mixed()
            for filename, content_type, data in attachments:
                kind, *raw_params = (part.strip() for part in content_type.split(";"))
                maintype, _slash, subtype = kind.partition("/")
                params = dict(p.split("=", 1) for p in raw_params if "=" in p)
                if maintype == "text":
                    params.setdefault("charset", "utf-8")
                msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename, params=params)
        # Last: set_content() and make_mixed() move or clear Content-* headers.
        msg["Content-Language"] = lang
        return Rendered(msg, message_id)
