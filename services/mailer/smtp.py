"""A bounded pool of reused SMTP connections with the TLS modes of the settings.

aiosmtplib opens each session (greeting, EHLO, STARTTLS or implicit TLS, AUTH); then the connection is
spoken by `Session`, which pipelines MAIL FROM, RCPT TO and DATA in one write when the server offers
PIPELINING (RFC 2920): two round trips per mail instead of four, and no per-command locking. Errors
are aiosmtplib's exception types, so callers see the same codes either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.message import EmailMessage

import aiosmtplib

from services.mailer.dkim_signing import DkimSigner, signer_from_settings
from services.mailer.settings import MailerSettings

log = logging.getLogger(__name__)

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_MAX_LINE = 8192  # a reply line longer than this is not SMTP


def wire_format(data: bytes) -> bytes:
    """The message as DATA content: CRLF line endings, leading dots doubled, ending in CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _envelope(sender: str, recipient: str) -> bytes:
    return f"MAIL FROM:<{sender}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()


class _Replies(asyncio.Protocol):
    """Parses server replies and hands them, in order, to the futures waiting for them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._waiting: deque[asyncio.Future] = deque()
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def expect(self) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            future.set_exception(self.lost)
        else:
            self._waiting.append(future)
        return future

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end + 1])
            start = end + 1
            if len(line) < 4 or not line[:3].isdigit():
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed SMTP reply: {line[:80]!r}"))
                return
            self._lines.append(line[4:].strip())
            if line[3:4] != b"-":
                reply = aiosmtplib.SMTPResponse(int(line[:3]), b"\n".join(self._lines).decode("utf-8", "replace"))
                self._lines = []
                if self._waiting:
                    future = self._waiting.popleft()
                    if not future.done():
                        future.set_result(reply)
                elif reply.code == 421:  # the server is closing the session (idle timeout, shutdown)
                    self._fail(aiosmtplib.SMTPServerDisconnected(reply.message))
                    return
        del buffer[:start]
        if len(buffer) > _MAX_LINE:
            self._fail(aiosmtplib.SMTPResponseException(-1, "SMTP reply line too long"))

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost"))

    def _fail(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting for it any more
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Session:
    """One open SMTP session, taken over from aiosmtplib after EHLO/STARTTLS/AUTH."""

    def __init__(self, client: aiosmtplib.SMTP, timeout: float) -> None:
        self.timeout = timeout
        self.pipelining = client.supports_extension("pipelining")
        transport = client.transport
        if transport is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost while opening the session")
        self._replies = _Replies()
        transport.set_protocol(self._replies)
        self._replies.connection_made(transport)
        client.transport = client.protocol = None  # the client object is done; the session owns the socket
        self.broken = False
        self.content_sent = False  # of the last transaction: after this, a lost connection is ambiguous
        self.mails = 0  # mail transactions done on this session
        self._ahead: tuple[tuple[str, str], list[asyncio.Future]] | None = None  # see `send(then=…)`

    @property
    def is_open(self) -> bool:
        transport = self._replies.transport
        return not self.broken and self._ahead is None and self._replies.lost is None \
            and transport is not None and not transport.is_closing()

    async def send(self, sender: str, recipient: str, content: bytes, then: tuple[str, str] | None = None) -> str:
        """One mail transaction; `content` as `wire_format` made it. Returns the server's final reply.

        `then` (sender, recipient) is the envelope of the mail the caller sends next on this session, its
        content already in hand: MAIL, RCPT and DATA for it go out in the same write as this content (the
        content may lead a pipelined group, RFC 2920 §3.1), so each mail costs one write and one round
        trip. The caller must then send that mail next; a session left with an envelope ahead is closed.
        """
        replies = self._replies
        self.content_sent = False
        try:
            async with asyncio.timeout(self.timeout):
                if self._ahead is not None:
                    envelope, futures = self._ahead
                    self._ahead = None
                    if envelope != (sender, recipient):
                        self.close()
                        raise aiosmtplib.SMTPServerDisconnected("pipelined envelope out of order: session closed")
                    mail, rcpt, data = [await f for f in futures]
                elif self.pipelining:
                    futures = [replies.expect() for _ in range(3)]
                    replies.write(_envelope(sender, recipient))
                    mail, rcpt, data = [await f for f in futures]
                else:
                    answers = []
                    for command in (f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{recipient}>\r\n".encode(),
                                    b"DATA\r\n"):
                        future = replies.expect()
                        replies.write(command)
                        answers.append(await future)
                        if answers[-1].code >= 400:
                            break
                    mail, rcpt, data = (answers + [answers[-1]] * 3)[:3]
                if data.code != 354 or mail.code >= 400 or rcpt.code >= 400:
                    if data.code < 400:  # DATA taken although MAIL or RCPT failed: end the session
                        self.broken = True
                    await self._reset()
                    if mail.code >= 400:
                        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
                    if rcpt.code >= 400:
                        raise aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, recipient)
                    raise aiosmtplib.SMTPDataError(data.code, data.message)
                future = replies.expect()
                if then is not None and self.pipelining:
                    self._ahead = (then, [replies.expect() for _ in range(3)])
                    replies.write(content + b".\r\n" + _envelope(*then))
                else:
                    replies.write(content + b".\r\n")
                self.content_sent = True
                done = await future
        except (TimeoutError, asyncio.CancelledError):
            self.broken = True  # the dialogue's state is unknown: never reuse this connection
            raise
        except aiosmtplib.SMTPServerDisconnected:
            self.broken = True
            raise
        self.mails += 1
        if done.code >= 400:
            raise aiosmtplib.SMTPDataError(done.code, done.message)
        return done.message

    async def _reset(self) -> None:
        if self.broken:
            return
        future = self._replies.expect()
        self._replies.write(b"RSET\r\n")
        if (await future).code >= 400:
            self.broken = True

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            if self.is_open:
                future = self._replies.expect()
                self._replies.write(b"QUIT\r\n")
                await asyncio.wait_for(future, 5)
        self.close()

    def close(self) -> None:
        self.broken = True
        transport = self._replies.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class SmtpPool:
    def __init__(self, settings: MailerSettings, signer: DkimSigner | None = None) -> None:
        self.settings = settings
        self.signer = signer if signer is not None else signer_from_settings(settings)
        self._idle: list[Session] = []
        self._slots = asyncio.Semaphore(max(1, settings.smtp_pool_size))

    @property
    def size(self) -> int:
        return max(1, self.settings.smtp_pool_size)

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_seconds,
            use_tls=s.smtp_tls == "tls", start_tls=True if s.smtp_tls == "starttls" else False,
            validate_certs=s.smtp_validate_certs, cert_bundle=s.smtp_ca_file, username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
        )

    async def _open(self) -> Session:
        client = self._client()
        await client.connect()
        try:
            if client.is_ehlo_or_helo_needed:  # connect() greets only for STARTTLS or AUTH
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
            return Session(client, self.settings.smtp_timeout_seconds)
        except BaseException:
            client.close()
            raise

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Session]:
        async with self._slots:
            session = None
            while self._idle and session is None:
                candidate = self._idle.pop()
                if candidate.is_open:
                    session = candidate
            if session is None:
                session = await self._open()
            try:
                yield session
            finally:
                if session.is_open:
                    self._idle.append(session)
                else:
                    session.close()

    def prepare(self, message: EmailMessage | str | bytes, wire_ready: bool = False) -> bytes:
        """The message as it goes over the wire: DKIM-signed when a key is configured. `wire_ready`: the
        bytes already have CRLF line endings and no line starting with a dot (as the composer writes them)."""
        if isinstance(message, EmailMessage):
            # as_string(), not as_bytes(): it keeps bodies 7-bit (8bit parts become base64).
            message = message.as_string()
        data = message.encode("utf-8") if isinstance(message, str) else message
        if self.signer is not None:
            data = self.signer.sign(data)
        return data if wire_ready and self.signer is None else wire_format(data)

    async def send(self, message: EmailMessage | str | bytes, sender: str, recipient: str) -> str:
        """Send one message; a connection found closed before the mail went out is reopened once."""
        data = self.prepare(message)
        for attempt in (1, 2):
            async with self.connection() as session:
                try:
                    return await session.send(sender, recipient, data)
                except aiosmtplib.SMTPServerDisconnected:
                    if attempt == 2 or session.content_sent:  # the mail may have arrived: never twice
                        raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(session.quit() for session in idle), return_exceptions=True)
