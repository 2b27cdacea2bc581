"""Campaign mails composed from a skeleton rendered once per language (SPEC §2.5, and fast).

Rendering a whole mail per recipient (templates, Markdown, CSS inlining, the email package) costs
milliseconds; a campaign to 20,000 people cannot afford that. A `Skeleton` renders the campaign once
per language exactly as `MailRenderer` would, but with a marker wherever a recipient's value goes: each
staff placeholder (`{{ name }}`, `{{ name|upper }}`, …) and the unsubscribe and preferences links. A
recipient's mail is then the skeleton with the markers replaced — values HTML-escaped in the HTML part,
as Jinja's autoescape would — and the MIME structure written directly: headers, a multipart/alternative
of text and HTML (UTF-8, base64), and the attachments (also rendered once). Every mail is still unique
to its recipient: To, Message-ID, the links and List-Unsubscribe are theirs.

What cannot be split this way (a digest, written per recipient) is rendered by `MailRenderer` in full.
"""

from __future__ import annotations

import base64
import itertools
import secrets
import uuid
from collections.abc import Callable
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Any
from urllib.parse import quote_plus

from jinja2 import nodes
from markupsafe import Markup, escape

from services.mailer.render import POLICY, MailRenderer, Recipient, safe_header
from services.mailer.staff_text import PLACEHOLDERS, NotSplittable, expression, split
from shared.db import utcnow

LINKS = ("unsubscribe_url", "preferences_url")


def _base64(text: str) -> bytes:
    """UTF-8, base64 in lines of 76 (RFC 2045), each ending in CRLF."""
    encoded = base64.b64encode(text.encode("utf-8"))
    return b"\r\n".join([encoded[i:i + 76] for i in range(0, len(encoded), 76)]) + b"\r\n"


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")


class _Clock:
    """The Date header, formatted once per second rather than once per mail."""

    def __init__(self) -> None:
        self._second, self._value = -1, b""

    def now(self) -> bytes:
        now = utcnow()
        second = int(now.timestamp())
        if second != self._second:
            self._second, self._value = second, format_datetime(now.replace(microsecond=0)).encode()
        return self._value


_clock = _Clock()
# Message-IDs: random per process, then counted (unique without asking the OS for randomness per mail;
# the prefix is drawn here once — inside the generator expression it would be drawn for every mail).
_process_prefix = uuid.uuid4().hex
_message_ids = (f"{_process_prefix}.{n}" for n in itertools.count(1))


class FormLetter:
    """A mail rendered once with a marker wherever a recipient's value goes, composed for each recipient.

    `subject`, `text` and `html` are the rendered parts, `marker` the random prefix of the markers in
    them (`<marker><name>x`). `compose_values` fills them in: as they are in the subject and the text
    part, HTML-escaped in the HTML part (as Jinja's autoescape would have written them).
    """

    def __init__(self, renderer: MailRenderer, lang: str, subject: str, text: str, html: str, marker: str,
                 attachments: list[tuple[str, str, bytes]] = ()) -> None:
        self.renderer, self.lang, self._marker = renderer, lang, marker
        token = secrets.token_hex(5)
        self._unsubscribe = f"{renderer.base}/unsubscribe?token="
        self._preferences = f"{renderer.base}/preferences?token="
        if renderer.manage_links("t", lang) != {"unsubscribe_url": f"{self._unsubscribe}t&lang={lang}",
                                                 "preferences_url": f"{self._preferences}t&lang={lang}"}:
            raise NotSplittable("the renderer writes its links differently")
        self._subject = self._pieces(subject)
        self._text = self._pieces(_crlf(text))
        self._html = self._pieces(_crlf(html))
        self._subject_headers: dict[str, bytes] = {}

        boundary = f"=_bp{token}"
        constant = EmailMessage(policy=POLICY)
        constant["From"] = renderer.mail_from
        constant["Reply-To"] = renderer.reply_to
        self._from_reply_to = constant.as_bytes().rstrip(b"\r\n") + b"\r\n"
        alternative = (
            'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: base64\r\n\r\n',
            f'\r\n--{boundary}\r\nContent-Type: text/html; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: base64\r\n\r\n",
        )
        if attachments:
            outer = f"=_bpm{token}"
            self._content_type = f'Content-Type: multipart/mixed; boundary="{outer}"\r\n'.encode()
            self._open = (f"--{outer}\r\nContent-Type: multipart/alternative; boundary=\"{boundary}\"\r\n\r\n"
                          f"--{boundary}\r\n{alternative[0]}").encode()
            parts = []
            for filename, content_type, data in attachments:
                kind, *params = (part.strip() for part in content_type.split(";"))
                if kind.startswith("text/") and not any(p.startswith("charset=") for p in params):
                    params.insert(0, 'charset="utf-8"')
                safe_header(filename)
                parts.append(
                    f'--{outer}\r\nContent-Type: {"; ".join([kind, *params, f"name={filename}"])}\r\n'
                    f"Content-Transfer-Encoding: base64\r\n"
                    f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'.encode()
                    + base64.encodebytes(data).replace(b"\n", b"\r\n"))
            self._close = (f"\r\n--{boundary}--\r\n".encode() + b"".join(parts) + f"--{outer}--\r\n".encode())
        else:
            self._content_type = f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'.encode()
            self._open = f"--{boundary}\r\n{alternative[0]}".encode()
            self._close = f"\r\n--{boundary}--\r\n".encode()
        self._between = alternative[1].encode()
        self._tail_headers = (b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nMIME-Version: 1.0\r\n"
                              + self._content_type + f"Content-Language: {lang}\r\n\r\n".encode())

    def _pieces(self, rendered: str) -> list[str]:
        """`rendered` cut at the markers: fixed text at even positions, marker names at odd ones."""
        pieces: list[str] = []
        rest = rendered
        while (start := rest.find(self._marker)) >= 0:
            end = rest.index("x", start + len(self._marker))
            pieces += [rest[:start], rest[start + len(self._marker):end]]
            rest = rest[end + 1:]
        pieces.append(rest)
        return pieces

    @staticmethod
    def _fill(pieces: list[str], values: dict[str, str]) -> str:
        if len(pieces) == 1:
            return pieces[0]
        out = pieces[:]
        for i in range(1, len(out), 2):
            out[i] = values[out[i]]
        return "".join(out)

    def _subject_header(self, subject: str) -> bytes:
        header = self._subject_headers.get(subject)
        if header is None:
            safe_header(subject)
            if subject.isascii() and len(subject) < 900:
                header = f"Subject: {subject}\r\n".encode()
            else:
                encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")
                header = f"Subject: {encoded}\r\n".encode()
            if len(self._subject_headers) < 1000:
                self._subject_headers[subject] = header
        return header

    def links(self, manage_token: str) -> dict[str, str]:
        token = quote_plus(manage_token)  # as MailRenderer.manage_links writes the links (urlencode)
        return {"unsubscribe_url": f"{self._unsubscribe}{token}&lang={self.lang}",
                "preferences_url": f"{self._preferences}{token}&lang={self.lang}"}

    def compose_values(self, email: str, name: str | None, links: dict[str, str],
                       text_values: dict[str, str]) -> tuple[bytes, str]:
        """(the recipient's message as bytes, its Message-ID); `text_values` by marker name."""
        html_values = {key: str(escape(value)) for key, value in text_values.items()}
        subject = self._fill(self._subject, text_values)
        message_id = f"<{next(_message_ids)}@{self.renderer.domain}>"
        to = formataddr((safe_header(name), email), charset="utf-8") if name else email
        head = b"".join((
            b"Message-ID: ", message_id.encode(), b"\r\nDate: ", _clock.now(), b"\r\n", self._from_reply_to,
            b"To: ", to.encode(), b"\r\n", self._subject_header(subject),
            b"List-Unsubscribe: <", links["unsubscribe_url"].encode(), b">\r\n", self._tail_headers))
        body = b"".join((self._open, _base64(self._fill(self._text, text_values)), self._between,
                         _base64(self._fill(self._html, html_values)), self._close))
        return head + body, message_id


class Skeleton(FormLetter):
    """One campaign in one language, ready to be composed for each recipient."""

    def __init__(self, renderer: MailRenderer, language: str, subject_source: str, body_source: str,
                 attachments: list[tuple[str, str, bytes]] = ()) -> None:
        marker = f"bp{secrets.token_hex(5)}m"
        self._expressions: list[tuple[str, Callable[[dict[str, Any]], str] | str]] = []  # (marker, how or name)
        seen: dict[str, str] = {}

        def mark(node: nodes.Expr) -> str:
            key = repr(node)
            if key not in seen:
                seen[key] = str(len(self._expressions))
                # `{{ name }}` is looked up; anything else (filters, constants) is evaluated by Jinja
                self._expressions.append((seen[key], node.name if isinstance(node, nodes.Name) and node.name in
                                          PLACEHOLDERS else expression(node)))
            return f"{marker}{seen[key]}x"

        subject = split(subject_source, mark)
        body_text = split(body_source, mark)
        body_html = split(body_source, mark, markdown=True)
        links = {name: f"{marker}{name}x" for name in LINKS}
        lang, subject, text, html = renderer.render_parts(
            "campaign", Recipient("", None, language), "", {"body_html": Markup(body_html), "body_text": body_text},
            links=links, subject=subject)
        super().__init__(renderer, lang, subject, text, html, marker, attachments)

    def compose(self, email: str, name: str | None, manage_token: str) -> tuple[bytes, str]:
        """(the recipient's message as bytes, its Message-ID)."""
        links = self.links(manage_token)
        values: dict[str, Any] = {"name": name or "", "email": email, "organisation": self.renderer.organisation,
                                  **links}
        text_values = {key: values[how] if isinstance(how, str) else how(values)
                       for key, how in self._expressions}
        text_values.update(links)
        return self.compose_values(email, name, links, text_values)


class TransactionalLetters:
    """Confirmation and welcome mails composed from form letters (one per kind, language, with or
    without a name, and the values every recipient shares), like campaign mails from a skeleton: the
    template is rendered once, each mail only filled in. `compose` gives None where a mail has to be
    rendered in full (an address that is not ASCII)."""

    def __init__(self, renderer: MailRenderer) -> None:
        self.renderer = renderer
        self._letters: dict[tuple, FormLetter] = {}

    def compose(self, kind: str, recipient: Recipient, subject_key: str, shared: dict[str, Any],
                own: dict[str, str], manage_token: str) -> tuple[bytes, str] | None:
        """`shared`: context values alike for many recipients (part of the letter); `own`: the recipient's
        (filled in)."""
        if not recipient.email.isascii():
            return None
        renderer = self.renderer
        lang = recipient.language if recipient.language in renderer.tr.taxonomy.languages \
            else renderer.tr.taxonomy.default_language
        names = sorted(own)
        key = (kind, lang, bool(recipient.name), tuple(names), tuple(sorted(shared.items())))
        letter = self._letters.get(key)
        if letter is None:
            if len(self._letters) > 256:
                self._letters.clear()
            marker = f"bp{secrets.token_hex(5)}m"  # marker names: "name", the links, the own values' indexes
            lang, subject, text, html = renderer.render_parts(
                kind, Recipient("", f"{marker}namex" if recipient.name else None, lang), subject_key,
                {**shared, **{name: f"{marker}{i}x" for i, name in enumerate(names)}},
                links={name: f"{marker}{name}x" for name in LINKS})
            letter = self._letters[key] = FormLetter(renderer, lang, subject, text, html, marker)
        links = letter.links(manage_token)
        values = {"name": recipient.name or "", **{str(i): own[name] for i, name in enumerate(names)}, **links}
        return letter.compose_values(recipient.email, recipient.name, links, values)
