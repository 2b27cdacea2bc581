"""Development mail inbox: SMTP sink storing every message in a Maildir, plus a web page to read them."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import email.utils
import logging
import mailbox
import mimetypes
import re
import socket
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import uvicorn
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

log = logging.getLogger(__name__)

_POLICY = email.policy.default
_SMTP_HOSTNAME = "bridgepost-devinbox"
_START_TIMEOUT = 10.0
_SAFE_MIME_TYPE = re.compile(r"^[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+$")
_UNSAFE_FILENAME_CHARS = re.compile(r'[\x00-\x1f\x7f"\\/:;]')
# Message pages show untrusted HTML (inside a sandboxed srcdoc iframe, which inherits this policy).
_HTML_HEADERS = {
    "Content-Security-Policy": "script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


# --------------------------------------------------------------------------- Maildir helpers


def _ensure_maildir(path: Path) -> None:
    """Create the Maildir (and its parents / missing tmp,new,cur subdirectories)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mailbox.Maildir(str(path), create=True)
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)


def _open_maildir(path: Path) -> mailbox.Maildir:
    # A fresh instance per operation: Maildir objects cache a table of contents and are not thread-safe.
    return mailbox.Maildir(str(path), factory=None, create=False)


def _read_raw(path: Path, key: str) -> bytes | None:
    """The stored bytes of a message, exactly as received, or None for an unknown key."""
    try:
        with _open_maildir(path).get_file(key) as fh:
            return fh.read()
    except (KeyError, FileNotFoundError):
        return None


# --------------------------------------------------------------------------- message parsing


def _clean(text: str) -> str:
    """Turn surrogate-escaped raw bytes (8-bit headers/bodies) back into readable text."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_header(name: str, raw_value: str) -> str:
    try:
        value = str(_POLICY.header_fetch_parse(name, raw_value))
    except Exception:  # malformed header: show it undecoded rather than fail the page
        value = raw_value
    return _clean(value)


def _header_date(raw_value: str | None) -> datetime | None:
    if not raw_value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(_clean(raw_value))
    except (TypeError, ValueError, IndexError):
        return None
    return parsed


def _format_date(value: datetime) -> str:
    if value.tzinfo is None:
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return value.strftime("%Y-%m-%d %H:%M:%S %z")


@dataclass(frozen=True)
class _Summary:
    key: str
    sender: str
    to: str
    subject: str
    date: datetime
    received: float

    def as_json(self) -> dict[str, str]:
        return {
            "key": self.key,
            "from": self.sender,
            "to": self.to,
            "subject": self.subject,
            "date": self.date.isoformat(),
        }


def _summaries(path: Path) -> list[_Summary]:
    """All stored messages, newest (by delivery time) first."""
    box = _open_maildir(path)
    result: list[_Summary] = []
    for key in box.keys():
        try:
            msg = box.get_message(key)  # MaildirMessage: get_date() is the delivery time
        except (KeyError, FileNotFoundError):  # removed while listing
            continue
        raw_headers: dict[str, str] = {}
        for name, value in msg.raw_items():
            raw_headers.setdefault(name.lower(), value)
        received = msg.get_date()
        date = _header_date(raw_headers.get("date")) or datetime.fromtimestamp(received, UTC)
        result.append(
            _Summary(
                key=key,
                sender=_decode_header("From", raw_headers.get("from", "")),
                to=_decode_header("To", raw_headers.get("to", "")),
                subject=_decode_header("Subject", raw_headers.get("subject", "")),
                date=date,
                received=received,
            )
        )
    result.sort(key=lambda s: (s.received, s.key), reverse=True)
    return result


def _leaf_parts(part: email.message.Message) -> Iterator[email.message.Message]:
    """Every non-multipart part, depth first; message/rfc822 parts count as leaves."""
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        for sub in part.get_payload():
            yield from _leaf_parts(sub)
    else:
        yield part


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    if charset in ("us-ascii", "ascii"):  # 8-bit bytes in "ASCII" mail are nearly always UTF-8
        charset = "utf-8"
    try:
        text = payload.decode(charset, "replace")
    except LookupError:  # unknown charset
        text = payload.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _part_bytes(part: email.message.Message) -> bytes:
    if part.is_multipart():  # message/rfc822 and friends: hand out the embedded message
        return b"".join(sub.as_bytes(policy=_POLICY) for sub in part.get_payload())
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


@dataclass(frozen=True)
class _Attachment:
    index: int
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class _Parsed:
    headers: list[tuple[str, str]]
    subject: str
    text: str | None
    html: str | None
    attachments: list[_Attachment]


def _find_body(msg: email.message.EmailMessage, subtype: str) -> email.message.Message | None:
    try:
        return msg.get_body(preferencelist=(subtype,))
    except Exception:  # malformed structure
        return None


def _parse(raw: bytes) -> _Parsed:
    msg = email.message_from_bytes(raw, policy=_POLICY)
    assert isinstance(msg, email.message.EmailMessage)
    headers = [(_clean(name), _decode_header(name, value)) for name, value in msg.raw_items()]
    subject = next((value for name, value in headers if name.lower() == "subject"), "")
    text_part = _find_body(msg, "plain")
    html_part = _find_body(msg, "html")
    attachments: list[_Attachment] = []
    for part in _leaf_parts(msg):
        if part is text_part or part is html_part:
            continue
        index = len(attachments)
        content_type = part.get_content_type()
        try:
            filename = _clean(part.get_filename() or "")
        except Exception:
            filename = ""
        if not filename:
            extension = mimetypes.guess_extension(content_type) or ".bin"
            filename = f"attachment-{index}{extension}"
        attachments.append(_Attachment(index, filename, content_type, _part_bytes(part)))
    return _Parsed(
        headers=headers,
        subject=subject,
        text=_part_text(text_part) if text_part is not None else None,
        html=_part_text(html_part) if html_part is not None else None,
        attachments=attachments,
    )


def _content_disposition(filename: str) -> str:
    name = _UNSAFE_FILENAME_CHARS.sub("_", filename).strip() or "attachment"
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


# --------------------------------------------------------------------------- HTML

_TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} · bridgepost dev inbox</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 72rem; padding: 0 1rem; }
  h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 1.5rem; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; vertical-align: top; padding: .3rem .6rem; border-bottom: 1px solid #ddd; }
  th { background: #f4f4f4; }
  td { overflow-wrap: anywhere; }
  pre { background: #f8f8f8; border: 1px solid #ddd; padding: .8rem; white-space: pre-wrap; }
  pre { overflow-wrap: anywhere; }
  iframe { width: 100%; height: 40rem; border: 1px solid #ddd; background: #fff; }
  .muted { color: #777; }
</style>
</head>
<body>
<p><a href="/">Inbox</a></p>
{% block body %}{% endblock %}
</body>
</html>
""",
    "index.html": """{% extends "base.html" %}
{% block title %}Inbox{% endblock %}
{% block body %}
<h1>Dev inbox <span class="muted">({{ messages|length }} message(s))</span></h1>
{% if messages %}
<table>
<thead><tr><th>Date</th><th>From</th><th>To</th><th>Subject</th></tr></thead>
<tbody>
{% for m in messages %}
<tr>
<td>{{ format_date(m.date) }}</td>
<td>{{ m.sender }}</td>
<td>{{ m.to }}</td>
<td><a href="/messages/{{ m.key|q }}">{{ m.subject or "(no subject)" }}</a></td>
</tr>
{% endfor %}
</tbody>
</table>
{% else %}
<p class="muted">No messages yet. Send mail to the SMTP port and reload.</p>
{% endif %}
{% endblock %}
""",
    "message.html": """{% extends "base.html" %}
{% block title %}{{ msg.subject or "(no subject)" }}{% endblock %}
{% block body %}
<h1>{{ msg.subject or "(no subject)" }}</h1>
<p><a href="/messages/{{ key|q }}/raw">View raw message</a></p>
<h2>Headers</h2>
<table>
<tbody>
{% for name, value in msg.headers %}
<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}
</tbody>
</table>
<h2>Text part</h2>
{% if msg.text is not none %}<pre>{{ msg.text }}</pre>
{% else %}<p class="muted">No text/plain part.</p>{% endif %}
<h2>HTML part</h2>
{% if msg.html is not none %}
<iframe sandbox srcdoc="{{ msg.html }}" title="HTML part"></iframe>
{% else %}<p class="muted">No text/html part.</p>{% endif %}
<h2>Attachments</h2>
{% if msg.attachments %}
<ul>
{% for a in msg.attachments %}
<li><a href="/messages/{{ key|q }}/attachments/{{ a.index }}">{{ a.filename }}</a>
<span class="muted">({{ a.content_type }}, {{ a.data|length }} bytes)</span></li>
{% endfor %}
</ul>
{% else %}<p class="muted">None.</p>{% endif %}
{% endblock %}
""",
    "404.html": """{% extends "base.html" %}
{% block title %}Not found{% endblock %}
{% block body %}
<h1>Not found</h1>
<p>{{ what }}</p>
{% endblock %}
""",
}

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(_TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)
_ENV.filters["q"] = lambda value: quote(str(value), safe="")
_ENV.globals["format_date"] = _format_date


def _render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    body = _ENV.get_template(template).render(**context)
    return HTMLResponse(body, status_code=status_code, headers=_HTML_HEADERS)


def _not_found(what: str) -> HTMLResponse:
    return _render("404.html", status_code=404, what=what)


# --------------------------------------------------------------------------- servers


class _Handler:
    """aiosmtpd handler: accept every recipient, store every message verbatim."""

    def __init__(self, maildir: Path) -> None:
        self._maildir = maildir
        self._lock = threading.Lock()

    def _store(self, data: bytes) -> str:
        with self._lock:
            return mailbox.Maildir(str(self._maildir), factory=None, create=True).add(data)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content
        if data is None:
            data = envelope.content if isinstance(envelope.content, bytes) else b""
        try:
            key = await asyncio.to_thread(self._store, data)
        except OSError:
            log.exception("dev inbox could not store a message (%d bytes)", len(data))
            return "451 Requested action aborted: could not store message"
        log.info(
            "dev inbox stored message %s (%d bytes, %d recipients)", key, len(data), len(envelope.rcpt_tos)
        )
        return "250 Message accepted for delivery"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn server that leaves signal handling to the host process (it is stopped via should_exit)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


def _bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: uvicorn calls sys.exit() when it cannot bind."""
    family, type_, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DevInbox:
    """SMTP sink + web viewer for development. ``start()`` / ``stop()`` from a running event loop."""

    def __init__(
        self,
        maildir: Path,
        smtp_host: str = "127.0.0.1",
        smtp_port: int = 1025,
        web_host: str = "127.0.0.1",
        web_port: int = 8025,
    ) -> None:
        self.maildir = Path(maildir)
        self.smtp_host = smtp_host
        self.smtp_port = smtp_port
        self.web_host = web_host
        self.web_port = web_port
        self._smtp_server: asyncio.base_events.Server | None = None
        self._smtp_sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self._web_server: uvicorn.Server | None = None
        self._web_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start the SMTP and web servers; returns once both accept connections."""
        if self._smtp_server is not None or self._web_task is not None:
            raise RuntimeError("DevInbox is already running")
        # aiosmtpd logs every command, sender and recipient at INFO on "mail.log"; keep addresses out of
        # the logs unless someone deliberately configured that logger.
        smtp_log = logging.getLogger("mail.log")
        if smtp_log.level == logging.NOTSET:
            smtp_log.setLevel(logging.WARNING)
        await asyncio.to_thread(_ensure_maildir, self.maildir)
        try:
            await self._start_smtp()
            await self._start_web()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "dev inbox running: SMTP on %s:%d, web on http://%s:%d/, maildir %s",
            self.smtp_host,
            self.smtp_port,
            self.web_host,
            self.web_port,
            self.maildir,
        )

    async def _start_smtp(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self.maildir)

        def factory() -> SMTP:
            session = SMTP(handler, hostname=_SMTP_HOSTNAME, enable_SMTPUTF8=True, loop=loop)
            self._smtp_sessions.add(session)
            return session

        self._smtp_server = await loop.create_server(factory, host=self.smtp_host, port=self.smtp_port)
        assert self._smtp_server.sockets
        self.smtp_port = self._smtp_server.sockets[0].getsockname()[1]

    async def _start_web(self) -> None:
        sock = _bind_socket(self.web_host, self.web_port)
        self.web_port = sock.getsockname()[1]
        try:
            config = uvicorn.Config(
                self.create_web_app(),
                host=self.web_host,
                port=self.web_port,
                log_level="warning",
                timeout_graceful_shutdown=5,
            )
        except BaseException:
            sock.close()
            raise
        server = _EmbeddedServer(config)
        self._web_server = server
        self._web_task = asyncio.create_task(server.serve(sockets=[sock]), name="devinbox-web")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        while not server.started:
            if self._web_task.done():
                sock.close()
                exc = self._web_task.exception()
                raise RuntimeError("dev inbox web server did not start") from exc
            if loop.time() > deadline:
                raise RuntimeError("dev inbox web server did not start in time")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop both servers (idempotent)."""
        server, task = self._web_server, self._web_task
        self._web_server = self._web_task = None
        smtp_server, self._smtp_server = self._smtp_server, None
        try:
            if server is not None and task is not None:
                server.should_exit = True
                try:
                    await task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                except Exception:
                    log.exception("dev inbox web server failed")
        finally:
            if smtp_server is not None:
                smtp_server.close()
                for session in list(self._smtp_sessions):
                    transport = getattr(session, "transport", None)
                    if transport is not None:
                        transport.close()
                await smtp_server.wait_closed()

    # ----------------------------------------------------------------- web app

    def create_web_app(self) -> FastAPI:
        maildir = self.maildir
        app = FastAPI(title="bridgepost dev inbox", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/healthz")
        def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/api/messages")
        def api_messages() -> JSONResponse:
            return JSONResponse([s.as_json() for s in _summaries(maildir)])

        @app.get("/")
        def index() -> Response:
            return _render("index.html", messages=_summaries(maildir))

        @app.get("/messages/{key}")
        def message(key: str) -> Response:
            raw = _read_raw(maildir, key)
            if raw is None:
                return _not_found("There is no message with that key.")
            return _render("message.html", key=key, msg=_parse(raw))

        @app.get("/messages/{key}/raw")
        def message_raw(key: str) -> Response:
            raw = _read_raw(maildir, key)
            if raw is None:
                return _not_found("There is no message with that key.")
            return Response(
                raw, media_type="text/plain; charset=utf-8", headers={"X-Content-Type-Options": "nosniff"}
            )

        @app.get("/messages/{key}/attachments/{index}")
        def attachment(key: str, index: int) -> Response:
            raw = _read_raw(maildir, key)
            if raw is None:
                return _not_found("There is no message with that key.")
            attachments = _parse(raw).attachments
            if not 0 <= index < len(attachments):
                return _not_found("That message has no attachment with that number.")
            item = attachments[index]
            media_type = item.content_type if _SAFE_MIME_TYPE.match(item.content_type) else ""
            return Response(
                item.data,
                media_type=media_type or "application/octet-stream",
                headers={
                    "Content-Disposition": _content_disposition(item.filename),
                    "X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": "sandbox",
                },
            )

        return app


async def run_inbox(maildir: Path, smtp_port: int = 1025, web_port: int = 8025) -> None:
    """Run the dev inbox until cancelled; stops both servers cleanly on cancellation."""
    inbox = DevInbox(Path(maildir), smtp_port=smtp_port, web_port=web_port)
    await inbox.start()
    try:
        await asyncio.Event().wait()
    finally:
        await inbox.stop()
