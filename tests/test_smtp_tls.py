"""The SMTP client's TLS modes and credentials against real aiosmtpd servers with a test CA."""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from services.mailer.settings import MailerSettings
from services.mailer.smtp import SmtpPool


class Keep:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.received.append(envelope.content)
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"relay-user" and auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> tuple[trustme.CA, str]:
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, str(bundle)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


async def serve(factory, **kwargs) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, **kwargs)
    return server, server.sockets[0].getsockname()[1]


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.org", "TLS"
    msg.set_content("hello")
    return msg


def settings(port: int, mode: str, bundle: str, **extra) -> MailerSettings:
    return MailerSettings(environment="test", smtp_host="127.0.0.1", smtp_port=port, smtp_tls=mode,
                          smtp_ca_file=bundle, smtp_timeout_seconds=5, **extra)


async def test_starttls_required_with_credentials(ca) -> None:
    authority, bundle = ca
    keep = Keep()
    server, port = await serve(lambda: SMTP(keep, tls_context=server_context(authority), require_starttls=True,
                                            authenticator=authenticator, auth_required=True))
    try:
        pool = SmtpPool(settings(port, "starttls", bundle, smtp_username="relay-user", smtp_password="s3cret"))
        await pool.send(message(), "a@example.org", "b@example.org")
        await pool.send(message(), "a@example.org", "b@example.org")  # over the reused connection
        await pool.close()
        assert len(keep.received) == 2
        wrong = SmtpPool(settings(port, "starttls", bundle, smtp_username="relay-user", smtp_password="nope"))
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await wrong.send(message(), "a@example.org", "b@example.org")
    finally:
        server.close()


async def test_implicit_tls(ca) -> None:
    authority, bundle = ca
    keep = Keep()
    server, port = await serve(lambda: SMTP(keep), ssl=server_context(authority))
    try:
        pool = SmtpPool(settings(port, "tls", bundle))
        await pool.send(message(), "a@example.org", "b@example.org")
        await pool.close()
        assert len(keep.received) == 1
    finally:
        server.close()


async def test_starttls_mode_never_falls_back_to_plain_text(ca) -> None:
    _authority, bundle = ca
    keep = Keep()
    server, port = await serve(lambda: SMTP(keep))  # offers no STARTTLS
    try:
        pool = SmtpPool(settings(port, "starttls", bundle))
        with pytest.raises(aiosmtplib.SMTPException):
            await pool.send(message(), "a@example.org", "b@example.org")
        assert keep.received == []
    finally:
        server.close()


async def test_untrusted_certificate_is_refused(ca) -> None:
    authority, _bundle = ca
    keep = Keep()
    server, port = await serve(lambda: SMTP(keep), ssl=server_context(authority))
    try:
        pool = SmtpPool(MailerSettings(environment="test", smtp_host="127.0.0.1", smtp_port=port, smtp_tls="tls",
                                       smtp_timeout_seconds=5))
        with pytest.raises((aiosmtplib.SMTPException, ssl.SSLError, OSError)):
            await pool.send(message(), "a@example.org", "b@example.org")
        assert keep.received == []
    finally:
        server.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_pipelined_sessions_keep_each_transaction_apart(pipelining: bool) -> None:
    """Envelopes sent ahead with the previous content (RFC 2920) and refusals in between: every mail
    reaches exactly its recipient, a refused one is reported for itself, and the session stays usable."""
    from services.mailer.smtp import wire_format
    from tests.smtp_sink import SmtpSink

    sink = SmtpSink()
    sink.pipelining = pipelining
    sink.permanent["refused@example.org"] = "550 5.1.1 no such user"
    await sink.start()
    try:
        pool = SmtpPool(MailerSettings(environment="test", smtp_host="127.0.0.1", smtp_port=sink.port,
                                       smtp_timeout_seconds=5, smtp_pool_size=1))
        rcpts = ["a@example.org", "refused@example.org", "b@example.org", "c@example.org"]
        data = [wire_format(f"Subject: to {r}\r\n\r\n.leading dot\r\nbody\r\n".encode()) for r in rcpts]
        outcomes = []
        async with pool.connection() as session:
            assert session.pipelining is pipelining
            for i, rcpt in enumerate(rcpts):
                then = ("news@example.org", rcpts[i + 1]) if i + 1 < len(rcpts) else None
                try:
                    await session.send("news@example.org", rcpt, data[i], then=then)
                    outcomes.append("sent")
                except aiosmtplib.SMTPResponseException as exc:
                    outcomes.append(exc.code)
            assert session.is_open
        assert outcomes == ["sent", 550, "sent", "sent"]
        for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
            (msg,) = sink.to(rcpt)
            assert msg["Subject"] == f"to {rcpt}" and ".leading dot" in msg.get_content()
        assert sink.to("refused@example.org") == []
        # An envelope sent ahead but never followed by its mail: the session is not reused.
        async with pool.connection() as session:
            await session.send("news@example.org", "a@example.org", data[0], then=("news@example.org", "x@example.org"))
            ahead = session
        assert not ahead.is_open or not pipelining
        async with pool.connection() as session:
            assert session is not ahead or not pipelining
            await session.send("news@example.org", "c@example.org", data[3])
        assert len(sink.to("c@example.org")) == 2 and sink.to("x@example.org") == []
        await pool.close()
    finally:
        await sink.stop()
