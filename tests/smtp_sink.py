"""A real SMTP server (aiosmtpd) for tests: keeps every message, can answer 4xx/5xx on request."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from email.message import EmailMessage

from aiosmtpd.smtp import SMTP, Envelope, Session


class SmtpSink:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []
        self.accepted_at: list[float] = []  # loop time at which each of `messages` was accepted
        # Scripted answers to RCPT per recipient, used up in order (e.g. two "451 4.7.1 try later"),
        # and permanent ones (e.g. "550 5.1.1 no such user"); anything else is accepted.
        self.script: dict[str, list[str]] = {}
        self.permanent: dict[str, str] = {}
        self.rcpt_answer: Callable[[str], str | None] = self._scripted
        self.data_answer: Callable[[list[str]], str | None] = lambda _rcpts: None
        self.attempts: dict[str, int] = {}
        self.delay = 0.0  # seconds before answering DATA: a slow server, so a campaign takes a while
        self.pipelining = True  # announce PIPELINING in the EHLO answer
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        self.changed = asyncio.Event()

    def _scripted(self, address: str) -> str | None:
        if address in self.permanent:
            return self.permanent[address]
        queue = self.script.get(address)
        return queue.pop(0) if queue else None

    # aiosmtpd handler hooks
    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        # aiosmtpd reads commands one by one from the stream, so it serves a pipelining client; saying so
        # makes the mailer pipeline as it does with Postfix (RFC 2920), the path production takes.
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str, options) -> str:
        self.attempts[address.lower()] = self.attempts.get(address.lower(), 0) + 1
        answer = self.rcpt_answer(address.lower())
        if answer:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.data_answer([a.lower() for a in envelope.rcpt_tos])
        if answer:
            return answer
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(([a.lower() for a in envelope.rcpt_tos], msg))
        self.accepted_at.append(asyncio.get_running_loop().time())
        self.changed.set()
        return "250 Message accepted for delivery"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="sink.test", data_size_limit=10_000_000), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass  # a client that never said QUIT; the process ends anyway

    def to(self, address: str) -> list[EmailMessage]:
        address = address.lower()
        return [m for rcpts, m in self.messages if address in rcpts]

    async def wait_for(self, address: str, count: int = 1, timeout: float = 30.0) -> list[EmailMessage]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.to(address)) < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"expected {count} mail(s) to {address}, got {len(self.to(address))}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        return self.to(address)
