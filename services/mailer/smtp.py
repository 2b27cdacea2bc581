"""A bounded pool of reused SMTP connections (aiosmtplib) with the TLS modes of the settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage

import aiosmtplib

from services.mailer.dkim_signing import DkimSigner, signer_from_settings
from services.mailer.settings import MailerSettings

log = logging.getLogger(__name__)


class SmtpPool:
    def __init__(self, settings: MailerSettings, signer: DkimSigner | None = None) -> None:
        self.settings = settings
        self.signer = signer if signer is not None else signer_from_settings(settings)
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(max(1, settings.smtp_pool_size))

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host, port=s.smtp_port, timeout=s.smtp_timeout_seconds,
            use_tls=s.smtp_tls == "tls", start_tls=True if s.smtp_tls == "starttls" else False,
            validate_certs=s.smtp_validate_certs, cert_bundle=s.smtp_ca_file, username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        async with self._slots:
            client = self._idle.pop() if self._idle else None
            if client is None or not client.is_connected:
                client = self._client()
                await client.connect()
            healthy = False
            try:
                yield client
                healthy = True
            finally:
                if healthy and client.is_connected:
                    self._idle.append(client)
                else:
                    with contextlib.suppress(Exception):
                        client.close()

    async def send(self, message: EmailMessage | str, sender: str, recipient: str,
                   on_handover: Callable[[], Awaitable[bool]] | None = None) -> str | None:
        """Send one message (DKIM-signed when a key is configured); a connection closed by the server while
        idle is reopened once.

        `on_handover` runs once a connection is held, just before the message goes out; it records that
        the mail is now in flight. If it returns False the mail is not sent (None is returned).
        """
        # as_string(), not as_bytes(): it keeps bodies 7-bit (8bit parts become base64), as before.
        data = (message if isinstance(message, str) else message.as_string()).encode("utf-8")
        if self.signer is not None:
            data = self.signer.sign(data)
        handed_over = on_handover is None
        for attempt in (1, 2):
            async with self.connection() as client:
                if not handed_over:
                    if not await on_handover():
                        return None
                    handed_over = True
                try:
                    _errors, response = await client.sendmail(sender, [recipient], data)
                    return response
                except aiosmtplib.SMTPServerDisconnected:
                    if attempt == 2:
                        raise
                    client.close()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.quit(), 5)
            client.close()
